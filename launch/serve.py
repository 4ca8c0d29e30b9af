"""`jaxserve serve` from a checkout, with --config=FILE for MODEL (usage: jaxserve/commands/serve.py).

    python launch/serve.py --config=configs/smollm2_135m.py ...
"""
from jaxserve.cli import run
from jaxserve.commands.serve import main

if __name__ == "__main__":
    run(main)
