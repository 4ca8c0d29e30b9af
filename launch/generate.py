"""`jaxserve generate` from a checkout, with --config=FILE for MODEL (usage: jaxserve/commands/generate.py).

    python launch/generate.py --config=configs/smollm2_135m.py ...
"""
from jaxserve.cli import run
from jaxserve.commands.generate import main

if __name__ == "__main__":
    run(main)
