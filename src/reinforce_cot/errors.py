"""The errors users see as one line, `error: <message>`, instead of a traceback (reinforce_cot.cli prints them).

- ConfigError: bad input (a key, a value, a data row), found before any weights load where possible;
  the message names the key or row and the fix. Exit code 2.
- GenerationError: generation could not finish (a server that died or never answered); what was done is
  on disk and a rerun resumes. Not bad input, so exit code 1, like any other failure of a stage.
"""


class UserError(Exception):
    """An error whose message alone tells the user what happened and what to do; `exit_code` is the process'."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """Raised for invalid configuration or data, before any weights load where possible."""

    exit_code = 2


class GenerationError(UserError, RuntimeError):
    """Generation could not finish (server gone); what was done is on disk and a rerun resumes."""
