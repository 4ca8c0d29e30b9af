"""`jaxserve bench throughput` from a checkout, with --config=FILE for MODEL (usage: jaxserve/bench/throughput.py)."""
from jaxserve.bench.throughput import main
from jaxserve.cli import run

if __name__ == "__main__":
    run(main)
