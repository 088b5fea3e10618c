"""
Command-line flags that train.py and sample.py fill from more than one place. A flag left out is
None until it takes a value from, in order: a stored config (a checkpoint's, a resumed run's flags),
then the script's defaults; a flag given with a value that contradicts a stored one is refused,
naming it.

    # stored values fill, others refused
    agree(args, checkpoint["config"], path, "the checkpoint's")
    # defaults for what is still None
    fill(args, {"steps": 400_000})
    at_least(args, 1, "steps", "log_every")                         # a range, by the flag's name
"""


def flag(name):
    """The command-line spelling of an argparse destination: global_batch_size ->
    --global-batch-size."""
    return "--" + name.replace("_", "-")


def fill(args, defaults):
    """The flags left out (None) take these defaults."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def at_least(args, low, *names):
    """A flag given below `low` -> a ValueError naming it (flags left out, None, pass)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"{flag(name)} {value}: must be at least {low}")


def agree(args, stored, source, whose, free=()):
    """Flags left out (None) take the stored values; flags given with other values (outside `free`)
    -> one ValueError naming each. A checkpoint's config, or a resumed run's flags, decide what was
    left out."""
    def show(v):
        return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v

    differ = []
    for key, value in stored.items():
        given = getattr(args, key, None)
        if given is None or given is False:          # left out (a store_true flag: not given)
            setattr(args, key, value)
        elif given != value and key not in free:
            differ.append(f"{flag(key)} {show(given)} differs from {whose} {show(value)}")
    if differ:
        raise ValueError(f"{source} does not fit the flags given: {'; '.join(differ)}; leave them "
                         f"out to use {whose}")
