"""The `jaxserve` console script's commands, one module each: its absl flags and its `main(argv)`.

`jaxserve.cli.main` imports only the command it runs, so `jaxserve CMD --help` lists that
command's flags; `launch/CMD.py` runs the same module from a checkout.
"""
