"""`jaxserve convert` from a checkout, with --config=FILE for MODEL (usage: jaxserve/commands/convert.py).

    python launch/convert.py --config=configs/smollm2_135m.py ...
"""
from jaxserve.cli import run
from jaxserve.commands.convert import main

if __name__ == "__main__":
    run(main)
