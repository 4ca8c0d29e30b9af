"""`jaxserve bench spot` from a checkout, with --config=FILE for MODEL (usage: jaxserve/bench/spot.py)."""
from jaxserve.bench.spot import main
from jaxserve.cli import run

if __name__ == "__main__":
    run(main)
