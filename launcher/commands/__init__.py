"""The `performer` subcommands beside pretraining, one module each: ``export`` (a checkpoint to a
pretrained directory), ``generate`` (sample from one), ``check`` (inputs and checkpoints before a
job), ``doctor`` (a launch's topology and collectives), ``slurm`` (an sbatch script for a run).

Each module exposes ``add_parser(subparsers)``; ``launcher/__main__.py`` is the table of them.
The trainer's own command is ``launcher/pretrain.py``, the module that launchers start.
"""
