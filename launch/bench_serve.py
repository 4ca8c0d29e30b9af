"""`jaxserve bench serve` from a checkout (usage: jaxserve/bench/serve.py)."""
from jaxserve.bench.serve import main
from jaxserve.cli import run

if __name__ == "__main__":
    run(main)
