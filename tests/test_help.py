"""`python <script>.py --help` groups the flags as the paper does, and each group's first line says where its
defaults come from. The parsers are built in-process (no subprocess, no model)."""
import argparse
import importlib

import pytest

PARSERS = [
    ("detr", "get_args_parser"),
    ("pvt", "get_args_parser"),
    ("pvt", "get_detect_args_parser"),
    ("vistr", "get_args_parser"),
    ("trackformer", "get_args_parser"),
    ("adaptsegnet", "get_args_parser"),
    ("advent", "get_args_parser"),
    ("proda", "get_args_parser"),
]


def grouping_problems(parser):
    """What is wrong with the parser's groups: flags outside every group (the default 'options'), empty or
    duplicate groups, groups whose description does not start with 'defaults: ', groups missing from --help."""
    groups = [g for g in parser._action_groups if g not in (parser._positionals, parser._optionals)]
    problems = [] if groups else ["no argument groups"]
    titles = [g.title for g in groups]
    if len(set(titles)) != len(titles):
        problems.append(f"a group title twice: {titles}")
    default = parser._positionals._group_actions + parser._optionals._group_actions
    ungrouped = [a.option_strings or a.dest for a in default if not isinstance(a, argparse._HelpAction)]
    if ungrouped:
        problems.append(f"flags outside the paper's groups: {ungrouped}")
    help_text = parser.format_help()
    for group in groups:
        if not group._group_actions:
            problems.append(f"group {group.title!r} is empty")
        if not (group.description or "").startswith("defaults: "):
            problems.append(f"group {group.title!r} does not say where its defaults come from: {group.description!r}")
        elif f"\n{group.title}:\n  defaults: " not in help_text:
            problems.append(f"--help does not list group {group.title!r}")
    return problems


@pytest.mark.parametrize("script,function", PARSERS)
def test_every_flag_is_in_a_group_whose_description_says_where_its_defaults_come_from(script, function):
    problems = grouping_problems(getattr(importlib.import_module(script), function)())
    assert problems == [], f"{script}.{function}: " + "; ".join(problems)


def test_the_check_finds_an_ungrouped_flag_and_a_group_without_its_source():
    parser = argparse.ArgumentParser()
    parser.add_argument_group("model", "defaults: the official model.py").add_argument("--depth", default=50)
    parser.add_argument_group("loss", "weights of the terms").add_argument("--eos_coef", default=0.1)
    parser.add_argument("--seed", default=0)
    problems = "\n".join(grouping_problems(parser))
    assert "flags outside the paper's groups: [['--seed']]" in problems
    assert "group 'loss' does not say where its defaults come from" in problems
    assert "'model'" not in problems
