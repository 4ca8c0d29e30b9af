"""`python -m jaxserve COMMAND MODEL ...`, the same as the `jaxserve` console script."""
from jaxserve.cli import main

main()
