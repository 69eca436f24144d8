"""The one way a test's servers and clients are used in a ``with`` block."""

from __future__ import annotations

import contextlib
from typing import Any, Self


class StartStop:
    """``with X(...) as x:`` starts ``x`` on entry and stops it on exit, however the block
    ends; a ``start`` that fails half-way is stopped too, so nothing it began outlives the
    test. Subclasses define :meth:`start` and :meth:`stop`; ``stop`` must therefore accept
    an object that is only partly started (fixtures also call it in their teardown). Enter
    a fresh object: on one that is already started, a failing second start stops it."""

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> Any:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            # The start's error is the one to see; a failing stop must not replace it.
            with contextlib.suppress(Exception):
                self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
