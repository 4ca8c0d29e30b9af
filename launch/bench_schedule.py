"""`jaxserve bench schedule` from a checkout, with --config=FILE for MODEL (usage: jaxserve/bench/schedule.py)."""
from jaxserve.bench.schedule import main
from jaxserve.cli import run

if __name__ == "__main__":
    run(main)
