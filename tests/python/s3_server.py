"""moto's standalone S3 server, with conditional writes decided atomically as S3 decides them.

moto checks `If-None-Match` / `If-Match` and then stores the object as two steps, on a thread
per request, so two concurrent conditional PUTs of one key can both succeed. Delta commits on
S3 rely on exactly that condition (the first writer of a log entry wins), so the tests'
server serializes the requests that write objects; reads stay concurrent.

Arguments are moto.server's own (-H HOST -p PORT ...).
"""

import functools
import sys
import threading

from moto.s3.responses import S3Response
from moto.server import main

_writes = threading.Lock()


def _serialized(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with _writes:
            return method(self, *args, **kwargs)

    return locked


# PUT object (conditional PUTs included) and POST on a key (completing a multipart upload,
# which also honours If-None-Match).
S3Response.put_object = _serialized(S3Response.put_object)
S3Response._key_response_post = _serialized(S3Response._key_response_post)

if __name__ == "__main__":
    main(sys.argv[1:])
