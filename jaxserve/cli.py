"""Shared plumbing of the absl launchers: flag parsing and user errors as one clear line."""
from __future__ import annotations

import os
import re
import sys
import tempfile

from absl import app, flags, logging
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from jaxserve import configs, paths


def fetch_remote_config_files(argv, flag_values=flags.FLAGS, folder: str = "") -> list:
    """argv with every config-file flag that names a URL (`--config=gs://b/x.py[:arg]`, or
    `file://`) pointed at a fresh local copy: ml_collections loads config files by local path
    only, and would take the URL's own colon for its `:arg` separator. Fetched every run, never
    cached, so an edited config in the bucket is what the next run reads."""
    out = []
    for arg in argv:
        m = re.match(r"--(\w+)=(.*)$", arg)
        if m and m.group(1) in flag_values and isinstance(flag_values[m.group(1)].parser, ConfigFileFlagParser):
            url, config_arg = configs.split_spec(m.group(2))
            if re.match(r"(gs|s3|file)://", url):
                try:
                    text = paths.as_path(url).read_text()
                except FileNotFoundError:
                    raise FileNotFoundError(f"--{m.group(1)}: no config file at {url}") from None
                folder = folder or tempfile.mkdtemp(prefix="jaxserve-config-")
                local = os.path.join(folder, f"{m.group(1)}_{os.path.basename(url)}")
                with open(local, "w") as f:
                    f.write(text)
                arg = f"--{m.group(1)}={local}" + ("" if config_arg is None else f":{config_arg}")
        out.append(arg)
    return out


def _parse_flags(argv):
    try:
        return flags.FLAGS(fetch_remote_config_files(argv))
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no existing field
        # its message quotes the name (escaped, with a "Did you mean" suggestion after it)
        text = str(e).replace("\\", "")
        key = (re.findall(r"[\w]+", text) or [text])[0]
        bad = [m.group(1) for a in argv for m in [re.match(r"--config\.([\w.]+)=?", a)]
               if m and m.group(1).split(".")[-1] == key]
        field = bad[0] if bad else key
        hint = re.search(r'Did you mean "(\w+)"', text)
        sys.stderr.write(f"error: config field {field!r} does not exist"
                         + (f" (did you mean {hint.group(1)!r}?)" if hint else "") + "\n")
        sys.exit(2)
    except (flags.Error, FileNotFoundError) as e:
        sys.stderr.write(f"error: {_one_line(e)}\n")
        sys.exit(2)


def _one_line(e: Exception) -> str:
    """An error's message on one line; a config file ml_collections could not load, by its path."""
    missing = re.search(r"No such file or directory: '([^']+)'", str(e))
    return f"no config file at {missing.group(1)}" if missing else " ".join(str(e).split())


def run(main) -> None:
    """app.run(main), with user mistakes (bad config, missing files) reported without a traceback."""
    def wrapped(argv):
        logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except (ValueError, OSError) as e:  # OSError: ml_collections loads config files on first use
            sys.stderr.write(f"error: {_one_line(e)}\n")
            sys.exit(2)
    app.run(wrapped, flags_parser=_parse_flags)


COMMANDS = {"generate": "a streamed answer to one prompt", "serve": "an OpenAI-compatible HTTP server",
            "convert": "a GGUF file or Hugging Face directory as a jaxserve checkpoint",
            "bench": "a benchmark: bench throughput|serve|schedule|spot|device [MODEL] (see jaxserve.bench)"}
BENCHES = ("throughput", "serve", "schedule", "spot", "device")  # jaxserve.bench's modules


def usage() -> str:
    lines = ["usage: jaxserve COMMAND [MODEL] [--flags] [--config.SECTION.FIELD=VALUE ...]", "", "commands:"]
    lines += [f"  {name:10s}{what}" for name, what in COMMANDS.items()]
    lines += ["", "MODEL: a packaged config (" + ", ".join(configs.names()) + "), a config file (.py), a GGUF",
              "file, or a Hugging Face or jaxserve checkpoint directory (default: " + configs.DEFAULT + ").",
              "`jaxserve COMMAND [MODEL] --help` lists its flags and every config field with MODEL's values."]
    return "\n".join(lines)


HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull")


def command_help(command: str, module_name: str, argv) -> str:
    """`jaxserve COMMAND [MODEL] --help`: the command's usage and flags, then every config field
    with the value it has for MODEL (after any --config.* overrides in argv) and what it is.
    --helpfull lists the flags of every module, absl's own too."""
    import importlib

    from jaxserve.config import describe

    module = importlib.import_module(module_name)
    _parse_flags([sys.argv[0]] + [a for a in argv if a not in HELP_FLAGS])
    flag_help = (flags.FLAGS.get_help() if "--helpfull" in argv
                 else flags.FLAGS.module_help(module.__name__))
    has_config = "config" in flags.FLAGS
    lines = [f"usage: jaxserve {command}" + (" [MODEL]" if has_config else "") + " [--flags]"
             + (" [--config.SECTION.FIELD=VALUE ...]" if has_config else ""), "",
             (module.__doc__ or "").strip(), "", "flags:", flag_help]
    if has_config:
        lines += ["", "config fields (this MODEL's values):", describe(flags.FLAGS["config"].value)]
    return "\n".join(lines)


def main(argv=None) -> None:
    """The `jaxserve` console script (and `python -m jaxserve`): `jaxserve COMMAND [MODEL] [flags]`."""
    import importlib

    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    command, rest = argv[1], argv[2:]
    if command not in COMMANDS:
        sys.stderr.write(f"error: no command {command!r} (one of {', '.join(COMMANDS)}); see jaxserve --help\n")
        sys.exit(2)
    module_name = f"jaxserve.commands.{command}"
    if command == "bench":
        if not rest or rest[0] not in BENCHES:
            sys.stderr.write(f"error: jaxserve bench needs a benchmark, one of {', '.join(BENCHES)}\n")
            sys.exit(2)
        command, module_name, rest = f"bench {rest[0]}", f"jaxserve.bench.{rest[0]}", rest[1:]
    if rest and not rest[0].startswith("-"):  # MODEL, as the config file that loads it
        try:
            rest = [f"--config={configs.config_spec(rest[0])}"] + rest[1:]
        except ValueError as e:
            sys.stderr.write(f"error: {e}\n")
            sys.exit(2)
    # before the command's flags are defined: absl names the defining module after argv[0]
    sys.argv = [f"jaxserve {command}"] + rest
    if any(a in HELP_FLAGS for a in rest):
        print(command_help(command, module_name, rest))
        sys.exit(0)
    run(importlib.import_module(module_name).main)
