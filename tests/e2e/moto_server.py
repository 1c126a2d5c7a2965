"""Starts moto's S3 server (for stores.MotoS3) with one fix to its signature check: moto rebuilds
the request it verifies a SigV4 signature against from a path and a query that are already
decoded, so a query value holding "/" (a listing's prefix, which object stores send on every
list) or an object key holding "%" (a landing-zone folder of an encoded name) is not encoded as
the client signed it, and every such request fails with SignatureDoesNotMatch. Signature Version
4 says each query name and value is URI-encoded, and for S3 the canonical URI is the key
URI-encoded once (docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html). The fix
encodes them before the check; nothing else of moto changes.

Usage: python3 moto_server.py PORT"""

import sys
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from flask import has_request_context
from flask import request as flask_request
from moto.iam import access_control
from moto.server import main

_create = access_control.IAMRequestBase._create_aws_request


def _with_encoded_query(self):
    request = _create(self)
    parts = urlsplit(request.url)
    # The path as the client sent it (S3 signs the key URI-encoded once, as it is on the wire).
    path = parts.path
    if has_request_context():
        raw = flask_request.environ.get("RAW_URI") or flask_request.environ.get("REQUEST_URI")
        if raw:
            path = urlsplit(raw).path
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in pairs)
    request.url = urlunsplit(parts._replace(path=path, query=query))
    return request


access_control.IAMRequestBase._create_aws_request = _with_encoded_query

if __name__ == "__main__":
    main(["-H", "127.0.0.1", "-p", sys.argv[1]])
