"""Multi-device training distributions (work in progress)."""
