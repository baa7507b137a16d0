"""Sub-commands for experiments, HPC and reduce (wired as they are built)."""


def add_commands(sub) -> None:
    pass
