"""Super-class discovery from a confusion matrix (work in progress)."""


def superclasses_from_confusion(confusion, num_superclasses, balanced=True, seed=0):
    """Not implemented yet."""
    raise NotImplementedError("superclasses_from_confusion is being written.")
