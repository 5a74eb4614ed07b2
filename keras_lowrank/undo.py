"""All-or-nothing changes made in steps: one log of how to undo each step.

Examples:

    >>> from keras_lowrank.undo import UndoLog
    >>> state = {"a": 1}
    >>> log = UndoLog()
    >>> old = state["a"]; state["a"] = 2
    >>> log.record(lambda: state.update(a=old))
    >>> log.rollback()
    >>> state
    {'a': 1}
"""


class UndoLog:
    """How to put back what a change made in steps did.

    Each step that changes something records, once it has, how to undo it
    (`record(undo)`), and optionally what to do once the whole change is
    final (`record(undo, commit=...)`: an adapter forgets the copy of the
    kernel its undo needed). When a later step fails, `rollback()` runs
    the undos, the last recorded first; when every step succeeded,
    `commit()` runs the final steps. Either way the log then forgets every
    step, and with them what their undos held (float layers, copies of
    variables).
    """

    def __init__(self):
        self._undo = []
        self._commit = []

    def record(self, undo, commit=None):
        """Remember `undo()`, which puts back what a step just did, and
        `commit()`, to run if the whole change succeeds."""
        self._undo.append(undo)
        if commit is not None:
            self._commit.append(commit)

    def rollback(self):
        """Undo every recorded step, the last first."""
        steps, self._undo, self._commit = self._undo, [], []
        for undo in reversed(steps):
            undo()

    def commit(self):
        """The change is final: run the commit steps, forget the undos."""
        steps, self._undo, self._commit = self._commit, [], []
        for commit in steps:
            commit()
