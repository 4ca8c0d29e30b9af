"""`jaxserve bench device` from a checkout, with --config=FILE for MODEL (usage: jaxserve/bench/device.py)."""
from jaxserve.bench.device import main
from jaxserve.cli import run

if __name__ == "__main__":
    run(main)
