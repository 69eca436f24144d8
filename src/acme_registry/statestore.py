"""The one place that turns ``STATE_STORE`` into a :class:`~.storage.Storage`.

``file``: :class:`~.storage.FileStorage` on ``DATA_DIR``; boto3 is never imported.
``s3``: :class:`~.statecrypt.EncryptedStorage` around :class:`~.s3storage.S3Storage`.

The conditional-write probe runs once per process and location, here, when the store is
opened: the agent at start, each issuing child, a CLI command that opens the store (4
small requests each). A store that ignores the conditions raises
:class:`~.storage.StoreUnsafe`, which callers turn into a refusal to run. A store that does
not answer does not stop the start (replicas keep serving from their cache): the probe then
runs before the first conditional write, which fails with the same error if it must.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from .storage import FileStorage, Storage, StoreUnavailable

if TYPE_CHECKING:
    from .config import Settings
    from .stateconfig import S3Location

log = logging.getLogger(__name__)

# Locations probed by this process, with the probe's finding on conditional deletes.
_probed: dict[S3Location, bool] = {}
_probed_guard = threading.Lock()


def open_storage(settings: Settings) -> Storage:
    """The state store the settings name (see the module's docstring for the probe)."""
    state = settings.state
    if not state.shared:
        return FileStorage(settings.data_dir)
    # Imported only here: boto3 costs tens of MiB that the file store never pays.
    from .s3storage import S3Storage, probe_conditional_writes
    from .statecrypt import EncryptedStorage

    assert state.s3 is not None and state.encryption_key is not None
    s3 = S3Storage(state.s3)
    with _probed_guard:
        if state.s3 in _probed:
            s3.conditional_delete = _probed[state.s3]
            s3.probed = True
        else:
            try:
                probe_conditional_writes(s3)
                _probed[state.s3] = s3.conditional_delete
            except StoreUnavailable as error:
                log.warning("state store unreachable at start (%s); probing it later", error)
    return EncryptedStorage(s3, state.encryption_key)
