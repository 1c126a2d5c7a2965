"""A Google Cloud Storage stand-in for the end-to-end tests: the XML API that azure_cdc's store client
speaks (object_store's GCS client), in memory, on 127.0.0.1, as strict as the service's public
documentation says it is.

Why our own: the emulators on PyPI do not speak this API. fake-gcs-server (fake-gcs-server-python-
wrapper) answers an XML PUT of an object with 400 "invalid uploadType"; gcp-storage-emulator answers
an XML bucket listing (list-type=2) with 501. Both also accept any credential.

Rules, each from Google's documentation:
- Requests carry `Authorization: Bearer <token>`; a service account may use a self-signed JWT
  (RS256, signed with its private key, `iss`/`sub` its e-mail, `exp` within an hour) instead of an
  OAuth token (developers.google.com/identity/protocols/oauth2/service-account, "Addendum:
  Service account authorization without OAuth"). A missing, malformed, expired or badly signed
  token is 401 (cloud.google.com/storage/docs/xml-api/reference-status, "401 Unauthorized").
- A principal without the permission an operation needs gets 403 AccessDenied (same page): here a
  "reader" may get, head and list; a "writer" may also put, copy, compose parts and delete.
- Objects: PUT (put-object-upload), PUT with x-goog-copy-source (put-object-copy), GET with Range
  and HEAD (get-object, head-object), DELETE (delete-object: 404 NoSuchKey when missing).
  `x-goog-if-generation-match: 0` makes a PUT or a copy succeed only if the object does not exist,
  else 412 PreconditionFailed (cloud.google.com/storage/docs/request-preconditions).
- Listing: GET /<bucket>?list-type=2 with prefix, delimiter, start-after, max-keys and
  continuation-token, at most 1000 keys a page (get-bucket-list).
- Multipart uploads (post-object-multipart, put-object-multipart, post-object-complete,
  delete-multipart): parts are numbered 1-10000; completion lists them in order with their ETags;
  an unknown upload id is 404 NoSuchUpload.
- A missing bucket is 404 NoSuchBucket.
"""

import base64
import hashlib
import itertools
import json
import re
import threading
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

PAGE = 1000


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def new_service_account(email):
    """A service account key as Google issues it (the JSON a credential's service_account_key holds),
    and its public key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    sa = {"type": "service_account", "private_key_id": hashlib.sha1(pem.encode()).hexdigest()[:16],
          "private_key": pem, "client_email": email}
    return sa, key.public_key()


class Object:
    def __init__(self, data, generation):
        self.data = data
        self.generation = generation
        self.etag = '"' + hashlib.md5(data).hexdigest() + '"'
        self.updated = datetime.now(timezone.utc)


class GcsStandIn:
    def __init__(self, port):
        self.port = port
        self.buckets = {}            # name -> {key: Object}
        self.uploads = {}            # upload id -> (bucket, key, {part number: bytes})
        self.principals = {}         # e-mail -> (public key, role)
        self.lock = threading.Lock()
        self.generations = itertools.count(1_000_000)
        self.upload_ids = itertools.count(1)
        self.requests = 0
        self.server = None
        self.thread = None

    # --- set-up -------------------------------------------------------------------------------------

    def add_principal(self, email, role):
        sa, public = new_service_account(email)
        self.principals[email] = (public, role)
        return sa

    def create_bucket(self, name):
        with self.lock:
            self.buckets.setdefault(name, {})

    def start(self):
        handler = _handler(self)
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # --- what the tests read back -----------------------------------------------------------------

    def names(self, bucket, prefix=""):
        with self.lock:
            return sorted(k for k in self.buckets[bucket] if k.startswith(prefix))

    def read(self, bucket, key):
        with self.lock:
            return self.buckets[bucket][key].data

    # --- the rules --------------------------------------------------------------------------------

    def authenticate(self, header):
        """The principal's role, or None: a self-signed JWT of a known service account, unexpired,
        signed with its key."""
        m = re.fullmatch(r"Bearer (\S+)", header or "")
        if not m:
            return None
        try:
            head_b64, body_b64, sig_b64 = m.group(1).split(".")
            head = json.loads(b64url_decode(head_b64))
            body = json.loads(b64url_decode(body_b64))
            if head.get("alg") != "RS256":
                return None
            public, role = self.principals[body["iss"]]
            public.verify(b64url_decode(sig_b64), f"{head_b64}.{body_b64}".encode(), padding.PKCS1v15(),
                          hashes.SHA256())
            now = time.time()
            if not (body["iat"] - 300 <= now <= body["exp"]) or body["exp"] - body["iat"] > 3600:
                return None
            return role
        except (KeyError, ValueError, InvalidSignature, TypeError):
            return None


def _xml_error(code, message):
    return f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()


def _handler(gcs):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status, body=b"", headers=None, head_only=False):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if not (headers or {}).get("Content-Length"):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and not head_only:
                self.wfile.write(body)

        def error(self, status, code, message):
            self.reply(status, _xml_error(code, message), {"Content-Type": "application/xml"})

        def body(self):
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def route(self):
            """(bucket, key, query) of the request; key '' for the bucket itself."""
            u = urlsplit(self.path)
            parts = u.path.lstrip("/").split("/", 1)
            bucket = unquote(parts[0])
            key = unquote(parts[1]) if len(parts) > 1 else ""
            return bucket, key, parse_qs(u.query, keep_blank_values=True)

        def handle_one(self, method):
            gcs.requests += 1
            body = self.body() if method in ("PUT", "POST") else b""
            role = gcs.authenticate(self.headers.get("Authorization"))
            if role is None:
                return self.error(401, "AuthenticationRequired", "Invalid or missing credentials.")
            bucket, key, q = self.route()
            with gcs.lock:
                if bucket not in gcs.buckets:
                    return self.error(404, "NoSuchBucket", "The specified bucket does not exist.")
                objects = gcs.buckets[bucket]
                writes = method in ("PUT", "POST", "DELETE")
                if writes and role != "writer":
                    return self.error(403, "AccessDenied", f"{role} does not have storage.objects.create access.")
                if method in ("GET", "HEAD") and not key:
                    return self.list(objects, q)
                if method in ("GET", "HEAD"):
                    return self.get(objects, key, method == "HEAD")
                if method == "DELETE" and "uploadId" in q:
                    gcs.uploads.pop(q["uploadId"][0], None)
                    return self.reply(204)
                if method == "DELETE":
                    if objects.pop(key, None) is None:
                        return self.error(404, "NoSuchKey", "The specified key does not exist.")
                    return self.reply(204)
                if method == "POST" and "uploads" in q:
                    uid = f"upload-{next(gcs.upload_ids)}"
                    gcs.uploads[uid] = (bucket, key, {})
                    xml = (f"<?xml version='1.0' encoding='UTF-8'?><InitiateMultipartUploadResult><Bucket>{bucket}</Bucket>"
                           f"<Key>{key}</Key><UploadId>{uid}</UploadId></InitiateMultipartUploadResult>")
                    return self.reply(200, xml.encode(), {"Content-Type": "application/xml"})
                if method == "POST" and "uploadId" in q:
                    return self.complete(objects, key, q["uploadId"][0], body)
                if method == "PUT" and "uploadId" in q:
                    up = gcs.uploads.get(q["uploadId"][0])
                    if up is None:
                        return self.error(404, "NoSuchUpload", "The specified multipart upload does not exist.")
                    n = int(q["partNumber"][0])
                    if not 1 <= n <= 10000:
                        return self.error(400, "InvalidArgument", "Part number must be between 1 and 10000.")
                    up[2][n] = body
                    return self.reply(200, headers={"ETag": '"' + hashlib.md5(body).hexdigest() + '"'})
                if method == "PUT":
                    source = self.headers.get("x-goog-copy-source")
                    if source is not None:
                        sb, _, sk = unquote(source).lstrip("/").partition("/")
                        src = gcs.buckets.get(sb, {}).get(sk)
                        if src is None:
                            return self.error(404, "NoSuchKey", "The copy source does not exist.")
                        body = src.data
                    return self.put(objects, key, body)
            return self.error(405, "MethodNotAllowed", "The method is not allowed.")

        def precondition(self, objects, key):
            match = self.headers.get("x-goog-if-generation-match")
            if match is None:
                return True
            current = objects.get(key)
            return (current.generation if current else 0) == int(match)

        def put(self, objects, key, data):
            if not self.precondition(objects, key):
                return self.error(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold.")
            o = Object(data, next(gcs.generations))
            objects[key] = o
            return self.reply(200, headers={"ETag": o.etag, "x-goog-generation": str(o.generation)})

        def complete(self, objects, key, uid, body):
            up = gcs.uploads.get(uid)
            if up is None:
                return self.error(404, "NoSuchUpload", "The specified multipart upload does not exist.")
            listed = [(int(p.findtext("PartNumber")), p.findtext("ETag")) for p in ET.fromstring(body).iter("Part")]
            if [n for n, _ in listed] != sorted(n for n, _ in listed) or any(n not in up[2] for n, _ in listed):
                return self.error(400, "InvalidPart", "One or more of the specified parts could not be found or are out of order.")
            for n, etag in listed:
                if etag.strip('"') != hashlib.md5(up[2][n]).hexdigest():
                    return self.error(400, "InvalidPart", "A part's ETag does not match.")
            data = b"".join(up[2][n] for n, _ in listed)
            if not self.precondition(objects, key):
                return self.error(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold.")
            del gcs.uploads[uid]
            o = Object(data, next(gcs.generations))
            objects[key] = o
            xml = (f"<?xml version='1.0' encoding='UTF-8'?><CompleteMultipartUploadResult><Key>{key}</Key>"
                   f"<ETag>{o.etag}</ETag></CompleteMultipartUploadResult>")
            return self.reply(200, xml.encode(), {"Content-Type": "application/xml", "x-goog-generation": str(o.generation)})

        def get(self, objects, key, head_only):
            o = objects.get(key)
            if o is None:
                return self.error(404, "NoSuchKey", "The specified key does not exist.")
            data, status, headers = o.data, 200, {}
            rng = self.headers.get("Range")
            if rng:
                m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng)
                if not m or (not m.group(1) and not m.group(2)):
                    return self.error(416, "InvalidRange", "The requested range cannot be satisfied.")
                size = len(data)
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:
                    start, end = max(0, size - int(m.group(2))), size - 1
                if start >= size or start > end:
                    return self.error(416, "InvalidRange", "The requested range cannot be satisfied.")
                data, status = data[start:end + 1], 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            headers.update({"ETag": o.etag, "x-goog-generation": str(o.generation),
                            "Last-Modified": o.updated.strftime("%a, %d %b %Y %H:%M:%S GMT"),
                            "Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
            return self.reply(status, data, headers, head_only)

        def list(self, objects, q):
            if q.get("list-type", [""])[0] != "2":
                return self.error(400, "InvalidArgument", "list-type=2 is expected.")
            prefix = q.get("prefix", [""])[0]
            delimiter = q.get("delimiter", [""])[0]
            after = q.get("continuation-token", q.get("start-after", [""]))[0]
            limit = min(int(q.get("max-keys", [PAGE])[0]), PAGE)
            keys, prefixes, more = [], [], False
            for k in sorted(k for k in objects if k.startswith(prefix) and k > after):
                if delimiter and after.endswith(delimiter) and k.startswith(after):
                    continue  # inside the common prefix the previous page ended with
                rest = k[len(prefix):]
                if delimiter and delimiter in rest:
                    p = prefix + rest.split(delimiter, 1)[0] + delimiter
                    if p not in prefixes:
                        if len(keys) + len(prefixes) == limit:
                            more = True
                            break
                        prefixes.append(p)
                    continue
                if len(keys) + len(prefixes) == limit:
                    more = True
                    break
                keys.append(k)
            out = ["<?xml version='1.0' encoding='UTF-8'?><ListBucketResult>"]
            for k in keys:
                o = objects[k]
                out.append(f"<Contents><Key>{_esc(k)}</Key><Size>{len(o.data)}</Size>"
                           f"<LastModified>{o.updated.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}</LastModified>"
                           f"<ETag>{_esc(o.etag)}</ETag></Contents>")
            for p in prefixes:
                out.append(f"<CommonPrefixes><Prefix>{_esc(p)}</Prefix></CommonPrefixes>")
            if more:
                last = max(keys[-1:] + prefixes[-1:])
                out.append(f"<NextContinuationToken>{_esc(last)}</NextContinuationToken>")
            out.append("</ListBucketResult>")
            return self.reply(200, "".join(out).encode(), {"Content-Type": "application/xml"})

        def do_GET(self):
            self.handle_one("GET")

        def do_HEAD(self):
            self.handle_one("HEAD")

        def do_PUT(self):
            self.handle_one("PUT")

        def do_POST(self):
            self.handle_one("POST")

        def do_DELETE(self):
            self.handle_one("DELETE")

    return Handler


def _esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
