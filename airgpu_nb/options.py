"""The command-line face of the settings table: promote options and ``-p``/``-r`` pairs.

The CLI, ``%airgpu promote`` and the panel's form all parse through :func:`add_promote_options`,
and every DAG header's "regenerate" command comes from :func:`regenerate_argv`, so a setting
declared in :mod:`airgpu_nb.settings` appears everywhere at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .kinds import Boolean, Invalid, Schedule, TextList
from .settings import SETTINGS, Setting, _targets
from .spec import parse_value

PARAMETER_FLAGS = {"-p": False, "--parameter": False, "-r": True, "--raw": True}


def add_promote_options(parser: argparse.ArgumentParser) -> None:
    """The promote options of the CLI, ``%airgpu promote`` and ``%airgpu panel``, from the
    table."""
    general = parser
    containers = parser.add_argument_group(
        "container and pod targets", "settings that only the targets in brackets take")
    for setting in SETTINGS:
        group = general if setting.takes("local") else containers
        if setting.name == "parameters":
            add_parameter_options(group)
            continue
        shown = setting.help
        if group is containers:
            shown += f" [{', '.join(sorted(setting.targets or ()))}]"
        kwargs: dict[str, Any] = {"dest": setting.name, "default": None, "help": shown}
        if isinstance(setting.kind, Boolean):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = setting.metavar or setting.name.upper().replace("_", "-")
            kwargs["type"] = _text_type(setting, item=setting.repeat)
            if setting.repeat:
                kwargs["action"] = "append"
            if setting.name == "target":
                kwargs["metavar"] = "|".join(_targets())
        group.add_argument(setting.cli_flag, **kwargs)


def add_parameter_options(parser: argparse.ArgumentParser | Any) -> None:
    parser.add_argument("-p", "--parameter", nargs=2, metavar=("NAME", "VALUE"),
                        action=_params_action(raw=False), dest="parameters",
                        help="override a parameters-cell value; VALUE is read like papermill's "
                             "-p (int, float, True/False, None, else a string); repeatable")
    parser.add_argument("-r", "--raw", nargs=2, metavar=("NAME", "VALUE"),
                        action=_params_action(raw=True), dest="parameters",
                        help="like -p, but VALUE stays a string; repeatable")


def _params_action(raw: bool) -> type[argparse.Action]:
    class Collect(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            name, value = values
            items = dict(getattr(namespace, "parameters", None) or {})
            items[name] = value if raw else parse_value(value)
            namespace.parameters = items

    return Collect


def _text_type(setting: Setting, item: bool) -> Callable[[str], Any]:
    kind = setting.kind.item if item and isinstance(setting.kind, TextList) else setting.kind

    def parse(text: str) -> Any:
        try:
            return kind.from_text(text)
        except Invalid as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = setting.name  # argparse names the type in some messages
    return parse


def split_parameters(argv: Sequence[str]) -> tuple[list[str], dict[str, Any] | None]:
    """Take every ``-p/-r NAME VALUE`` out of ``argv`` before argparse sees it.

    papermill's ``-p`` takes the next two words whatever they look like; argparse would read a
    VALUE such as ``-5x`` or ``--verbose`` as an option. Later pairs win, as in papermill.
    """
    rest: list[str] = []
    found: dict[str, Any] = {}
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            rest += words[i:]
            break
        if word in PARAMETER_FLAGS and i + 2 < len(words):
            name, value = words[i + 1], words[i + 2]
            found[name] = value if PARAMETER_FLAGS[word] else parse_value(value)
            i += 3
            continue
        rest.append(word)
        i += 1
    return rest, (found or None)


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Explicit settings from parsed promote options, checked (absent ones left out)."""
    found: dict[str, Any] = {}
    for setting in SETTINGS:
        value = getattr(args, setting.name, None)
        if value is None:
            continue
        found[setting.name] = (setting.parse(value, "command line")
                               if setting.name == "parameters" else value)
    return found


def regenerate_argv(settings: Mapping[str, Any], target: str) -> list[str]:
    """Promote options that reproduce ``settings`` (as ``PromotionSpec.settings()`` records
    them): every setting with a value, so layers in files cannot change the result."""
    argv: list[str] = []
    for setting in SETTINGS:
        if not setting.in_spec or not setting.takes(target):
            continue
        value = settings.get(setting.name)
        if setting.name == "parameters":
            for name, item in (value or {}).items():
                argv += (["-r", name, item] if isinstance(item, str)
                         else ["-p", name, repr(item)])
            continue
        if value is None and not isinstance(setting.kind, Schedule):
            continue
        if isinstance(setting.kind, Boolean):
            argv.append(setting.cli_flag if value else "--no-" + setting.cli_flag[2:])
        elif setting.repeat:
            for item in setting.kind.to_text(value):
                argv += [setting.cli_flag, item]
        else:
            argv += [setting.cli_flag, *setting.kind.to_text(value)]
    return argv
