"""The project's one error base class. Every error the project raises on purpose (bad input, a file that is not what
it should be, a run that cannot continue) derives from `DecMemError`, so a CLI catches it once and prints one line;
anything else is a bug and keeps its traceback. Most subclasses also derive from ValueError (or RuntimeError), so
code that caught those before still does."""


class DecMemError(Exception):
    """A problem with inputs, files or settings; the message names the file or field and what to do."""
