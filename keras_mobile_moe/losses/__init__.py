"""Losses of the Mobile V-MoE family."""

from keras_mobile_moe.losses.superclass_router_loss import SuperclassRouterLoss
