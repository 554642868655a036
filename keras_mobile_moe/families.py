"""The model families of the package: one registry, filled by the families.

A family (Mobile V-MoE, MoNE, ...) is a backbone class and a classifier
class (`keras_mobile_moe.models.base`). The backbone class declares what
the family is: `preset_family` (its key in the preset registry),
`family_title`, `paper`; the classifier module calls `register` once. Code
that must treat families differently (FLOPs, the model card, training
scripts) asks this registry, so adding a family means adding its folder,
not editing those modules.

This module imports nothing of the package: every other module may use it.
"""

import collections

Family = collections.namedtuple(
    "Family", ["name", "title", "paper", "backbone_cls", "task_cls"]
)
Family.__doc__ = """A registered model family.

Fields:
    name: the family's key in the preset registry (`"mobile_vmoe"`).
    title: its human name (`"Mobile V-MoE"`).
    paper: the citation of the paper it implements.
    backbone_cls: the backbone class.
    task_cls: the classifier (task) class.
"""

_FAMILIES = {}


def register(task_cls):
    """Registers the family of a classifier class (and of its backbone).

    Args:
        task_cls: a classifier class whose `backbone_cls` declares
            `preset_family`, `family_title` and `paper`.

    Returns:
        `task_cls` (so that it can be used as a decorator).

    Example:

    >>> import keras_mobile_moe as kmm
    >>> get("mone").task_cls is kmm.MoNE
    True
    """
    backbone_cls = task_cls.backbone_cls
    name = backbone_cls.preset_family
    known = _FAMILIES.get(name)
    if known is not None and known.task_cls is not task_cls:
        raise ValueError(
            f"Family {name!r} is already registered by "
            f"{known.task_cls.__name__}; {task_cls.__name__} cannot register "
            "it again."
        )
    _FAMILIES[name] = Family(
        name=name,
        title=backbone_cls.family_title,
        paper=backbone_cls.paper,
        backbone_cls=backbone_cls,
        task_cls=task_cls,
    )
    return task_cls


def get(name):
    """The registered `Family` of a preset-registry key, or None.

    Example:

    >>> import keras_mobile_moe as kmm
    >>> get("mobile_vmoe").title
    'Mobile V-MoE'
    >>> get("no_such_family") is None
    True
    """
    return _FAMILIES.get(name)


def all_families():
    """Every registered `Family`, in registration order.

    Example:

    >>> import keras_mobile_moe as kmm
    >>> [family.name for family in all_families()]
    ['mobile_vmoe', 'mone']
    """
    return tuple(_FAMILIES.values())


def of(model):
    """The `Family` of a backbone, a classifier, or one of their classes;
    None for anything else.

    Example:

    >>> import keras_mobile_moe as kmm
    >>> of(kmm.MoNEBackbone).name, of(kmm.MobileVMoE).name
    ('mone', 'mobile_vmoe')
    """
    cls = model if isinstance(model, type) else type(model)
    backbone_cls = getattr(cls, "backbone_cls", None) or cls
    for family in _FAMILIES.values():
        if isinstance(backbone_cls, type) and issubclass(
            backbone_cls, family.backbone_cls
        ):
            return family
    return None


def accepted_models():
    """The class names a function over every family accepts, for error
    messages: `"MobileVMoEImageClassifier, MobileVMoEBackbone, ..."`."""
    return ", ".join(
        f"{family.task_cls.__name__}, {family.backbone_cls.__name__}"
        for family in _FAMILIES.values()
    )
