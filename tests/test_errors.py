"""One error family: user errors are one line and exit 2; bugs keep their traceback."""

import inspect

import pytest

import fedtiny.errors as errors
from fedtiny.budget import memory
from fedtiny.tools.cli import EXIT_USAGE, main


def test_every_user_error_is_a_fedtiny_error():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) >= 9
    assert all(issubclass(c, errors.FedtinyError) for c in classes)
    # Not ValueError: a bug that raises ValueError must not pass for a user error.
    assert not any(issubclass(c, ValueError) for c in classes)


def test_user_error_is_one_line_exit_2(capsys):
    assert main(["memory", "--model", "tiny-ir", "--device", "no-such-board"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown profile 'no-such-board'" in err[0]


def test_internal_value_error_keeps_its_traceback(monkeypatch):
    def broken_plan(*args, **kwargs):
        raise ValueError("a bug deep inside the planner")

    monkeypatch.setattr(memory, "plan", broken_plan)
    with pytest.raises(ValueError, match="a bug deep inside the planner"):
        main(["memory", "--model", "tiny-ir", "--scheme", "full"])


def test_every_command_names_a_handler_that_exists():
    """The CLI imports a command's module only when it runs: a renamed handler must fail here, not for a user."""
    from fedtiny.tools.cli import COMMANDS, _import_handler

    def leaves(commands):
        for c in commands:
            yield from leaves(c.subcommands) if c.subcommands else [c]

    handlers = [c.handler for c in leaves(COMMANDS)]
    assert len(handlers) == len(set(handlers)) > 10 and all(callable(_import_handler(h)) for h in handlers)
