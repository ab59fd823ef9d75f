"""moto's server with its request recorder made thread-safe.

moto serves requests on several threads and its recorder appends each request to the recording
file without a lock, so concurrent WriteRecords calls interleave their lines. The tests rebuild
what Timestream would store from that recording, so each request must be written whole.
"""

import sys
import threading

from moto.moto_api._internal.recorder.models import Recorder
from moto.server import main

_lock = threading.Lock()
_record_request = Recorder._record_request


def _record_request_whole(self, *args, **kwargs):
    with _lock:
        return _record_request(self, *args, **kwargs)


Recorder._record_request = _record_request_whole

if __name__ == "__main__":
    sys.exit(main())
