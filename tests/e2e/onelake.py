"""OneLake stand-in: the DFS endpoint of OneLake (ADLS Gen2 "Path" REST operations), Microsoft Entra's
token endpoint for its service principals, and Fabric's open-mirroring replicator reading a mirrored
database's landing zone. Nothing emulates these (Azurite has no DFS endpoint: Azurite issues 409 and
553), so this is our own, written from the services' public documentation, and at least as strict:
where the documentation is silent, the stand-in refuses rather than guesses in the producer's favour.

Sources (cited next to each rule below):
  [PATH-CREATE] learn.microsoft.com/rest/api/storageservices/datalakestoragegen2/path/create
  [PATH-UPDATE] .../path/update     [PATH-DELETE] .../path/delete     [PATH-LIST] .../path/list
  [PATH-HEAD]   .../path/get-properties                               [PATH-READ] .../path/read
  [SWAGGER]     azure-rest-api-specs, specification/storage/data-plane/Microsoft.StorageDataLake
                (DataLakeStorage.json, error list of 2018-11-09)
  [PARITY]      fabric-docs docs/onelake/onelake-api-parity.md
  [ACCESS]      fabric-docs docs/onelake/onelake-access-api.md
  [LZ]          fabric-docs docs/mirroring/open-mirroring-landing-zone-format.md
  [BP]          fabric-docs docs/mirroring/open-mirroring-best-practices.md
  [AUTH]        learn.microsoft.com/rest/api/storageservices/authorize-with-azure-active-directory
  [ENTRA]       learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow
  [OS701]       apache/arrow-rs-object-store issue 701 (Blob Batch on OneLake)

The emulator runs in the test process (threads); tests and the replicator read its namespace
directly. Everything listens on 127.0.0.1."""

import base64
import collections
import email.utils
import hashlib
import hmac
import http.server
import io
import json
import os
import random
import socketserver
import threading
import time
import urllib.parse
import uuid

import pyarrow.parquet as pq

from replay import ROW_MARKER, Replayed, column_as_text

STORAGE_AUDIENCES = ("https://storage.azure.com", "https://storage.azure.com/")  # [AUTH], [ACCESS]
WRITE_ROLES = ("Admin", "Member", "Contributor")  # fabric-docs docs/onelake/security/get-started-security.md
READ_ROLES = WRITE_ROLES + ("Viewer",)
MIN_VERSION = "2017-11-09"  # bearer tokens need x-ms-version 2017-11-09 or later [AUTH]


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def http_date(t):
    return email.utils.formatdate(t, usegmt=True)


class Node:
    """A file or a directory of the namespace. Directories are real (hierarchical namespace) and have
    their own ETag, new each time the directory is created [LZ: the replicator tracks a folder by its
    ETag]."""

    __slots__ = ("is_dir", "data", "pending", "md5", "etag", "mtime")

    def __init__(self, is_dir):
        self.is_dir = is_dir
        self.data = b""
        self.pending = bytearray()  # appended, not yet flushed [PATH-UPDATE]
        self.md5 = None  # x-ms-content-md5 stored by the flush [PATH-UPDATE]
        self.etag = "0x8D%013X" % random.getrandbits(52)
        self.mtime = time.time()

    def touch(self):
        self.etag = "0x8D%013X" % random.getrandbits(52)
        self.mtime = time.time()


class Refusal(Exception):
    """An error reply: status, error code, message."""

    def __init__(self, status, code, message, headers=None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class OneLakeEmulator:
    """OneLake's DFS endpoint and Entra's token endpoint on one port.

    Workspaces are file systems; a workspace holds items (`<name>.MountedRelationalDatabase`), each
    with its managed folders `Files` and `Tables`, and, for a mirrored database, `Files/LandingZone`
    (Fabric creates it with the item)."""

    def __init__(self, port, latency_s=0.0):
        self.port = port
        self.latency_s = latency_s
        self.lock = threading.RLock()
        self.nodes = {}  # (workspace, path) -> Node; path "item/Files/…", "" is the workspace
        self.roles = {}  # workspace -> {client_id: role}
        self.principals = {}  # client_id -> (tenant, secret)
        self.managed = set()  # client ids of managed identities
        self.federated = {}  # client id -> subject of its federated credential (workload identity)
        self.key = os.urandom(32)  # signs the tokens this "Entra" issues
        self.federation_key = os.urandom(32)  # signs the platform's tokens that workload identities present
        self.tenant = str(uuid.uuid4())
        self.counts = collections.Counter()
        self.faults = []  # [(predicate, mode)] one-shot faults, see fail_next
        self.failure_rate = 0.0  # share of DFS requests answered 503 before they run
        self.page_size = 100  # listing and recursive delete pages (forces continuations)
        self.partitioned = False  # a network partition: requests hang, then are dropped unanswered
        self.hanging = 0  # requests that met the partition or a stall
        self.stalls = []  # predicates: a matching request waits until release() (a slow store)
        self.released = threading.Event()
        self.server = None

    # ---- set-up -------------------------------------------------------------------------------

    def start(self):
        emulator = self

        class Handler(_Handler):
            pass

        Handler.emulator = emulator
        self.server = _Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def add_workspace(self, ws):
        with self.lock:
            self.nodes[(ws, "")] = Node(True)
            self.roles.setdefault(ws, {})

    def add_mirrored_database(self, ws, item):
        """An item with its managed folders and its landing zone, as Fabric creates them."""
        with self.lock:
            for p in (item, f"{item}/Files", f"{item}/Tables", f"{item}/Files/LandingZone"):
                self.nodes[(ws, p)] = Node(True)

    def add_principal(self, roles):
        """A service principal (client id, secret) with a workspace role per workspace; returns the
        credential options azure_cdc needs to get its tokens from this endpoint."""
        client_id, secret = str(uuid.uuid4()), b64url(os.urandom(24))
        with self.lock:
            self.principals[client_id] = (self.tenant, secret)
            for ws, role in roles.items():
                self.roles.setdefault(ws, {})[client_id] = role
        return {"tenant_id": self.tenant, "client_id": client_id, "client_secret": secret,
                "authority_host": self.endpoint}

    def add_managed_identity(self, roles):
        """A user-assigned managed identity of "the machine" (its token endpoint is this emulator's
        /metadata/identity/oauth2/token); returns its client id."""
        client_id = str(uuid.uuid4())
        with self.lock:
            self.managed.add(client_id)
            for ws, role in roles.items():
                self.roles.setdefault(ws, {})[client_id] = role
        return client_id

    def add_workload_identity(self, roles, subject="system:serviceaccount:db:postgres"):
        """An app registration with a federated credential for `subject`; returns (options, the
        federated token a platform would write into the token file)."""
        client_id = str(uuid.uuid4())
        with self.lock:
            self.federated[client_id] = subject
            for ws, role in roles.items():
                self.roles.setdefault(ws, {})[client_id] = role
        now = int(time.time())
        claims = {"iss": "https://oidc.cluster.example", "sub": subject, "aud": "api://AzureADTokenExchange",
                  "iat": now, "exp": now + 3600}
        head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = b64url(json.dumps(claims).encode())
        sig = hmac.new(self.federation_key, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return {"tenant_id": self.tenant, "client_id": client_id, "authority_host": self.endpoint}, f"{head}.{body}.{b64url(sig)}"

    def grant(self, ws, client_id, role):
        with self.lock:
            if role is None:
                self.roles.get(ws, {}).pop(client_id, None)
            else:
                self.roles.setdefault(ws, {})[client_id] = role

    def token(self, client_id, audience="https://storage.azure.com", lifetime_s=3600, key=None):
        now = int(time.time())
        claims = {"aud": audience, "iss": f"https://sts.windows.net/{self.tenant}/", "tid": self.tenant,
                  "appid": client_id, "oid": client_id, "iat": now, "nbf": now - 60, "exp": now + lifetime_s}
        head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = b64url(json.dumps(claims).encode())
        sig = hmac.new(key or self.key, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{b64url(sig)}"

    def stall(self, predicate):
        """Requests `predicate(method, path, query, headers)` accepts wait, unanswered, until release()."""
        with self.lock:
            self.released.clear()
            self.stalls.append(predicate)

    def release(self):
        with self.lock:
            self.stalls.clear()
            self.released.set()

    def fail_next(self, predicate, mode="503"):
        """The next request `predicate(method, path, query, headers)` accepts fails once: "503"
        answers ServerBusy without running it; "lost" runs it and closes the connection without a
        reply (the client cannot know it ran)."""
        with self.lock:
            self.faults.append((predicate, mode))

    # ---- namespace helpers (tests and the replicator) -----------------------------------------

    def get(self, ws, path):
        return self.nodes.get((ws, path))

    def children(self, ws, path):
        prefix = path + "/" if path else ""
        return sorted(p[len(prefix):] for (w, p) in self.nodes
                      if w == ws and p.startswith(prefix) and p != path and "/" not in p[len(prefix):])

    def descendants(self, ws, path):
        prefix = path + "/"
        return sorted((p for (w, p) in self.nodes if w == ws and p.startswith(prefix)), key=lambda p: (-p.count("/"), p))

    def put_internal(self, ws, path, node):
        self.nodes[(ws, path)] = node

    def names(self, ws, prefix=""):
        """Every file path under `prefix` (tests)."""
        with self.lock:
            return sorted(p for (w, p), n in self.nodes.items() if w == ws and not n.is_dir and p.startswith(prefix))

    # ---- request handling ---------------------------------------------------------------------

    def authorize(self, ws, headers, write):
        """[AUTH], [ACCESS]: only Microsoft Entra bearer tokens for the storage audience; OneLake
        takes no account key ("OneLake only supports tokens in the Storage audience")."""
        auth = headers.get("Authorization", "")
        challenge = {"WWW-Authenticate": f"Bearer authorization_uri=https://login.microsoftonline.com/{self.tenant}/oauth2/authorize resource_id=https://storage.azure.com"}
        if not auth:
            raise Refusal(401, "NoAuthenticationInformation", "Server failed to authenticate the request. Please refer to the information in the www-authenticate header.", challenge)
        scheme, _, token = auth.partition(" ")
        if scheme != "Bearer":
            raise Refusal(401, "InvalidAuthenticationInfo", "OneLake only supports Microsoft Entra tokens (Bearer).", challenge)
        try:
            head, body, sig = token.split(".")
            want = hmac.new(self.key, f"{head}.{body}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(want, b64url_decode(sig)):
                raise ValueError("signature")
            claims = json.loads(b64url_decode(body))
        except Exception:
            raise Refusal(401, "InvalidAuthenticationInfo", "Signature validation failed.", challenge)
        if claims.get("aud") not in STORAGE_AUDIENCES:
            raise Refusal(401, "InvalidAuthenticationInfo", "Audience validation failed.", challenge)
        now = time.time()
        if not (claims.get("nbf", 0) <= now < claims.get("exp", 0)):
            raise Refusal(401, "InvalidAuthenticationInfo", "Lifetime validation failed. The token is expired.", challenge)
        version = headers.get("x-ms-version", "")
        if version < MIN_VERSION:
            raise Refusal(400, "InvalidHeaderValue", "x-ms-version 2017-11-09 or later is required for bearer tokens.")
        role = self.roles.get(ws, {}).get(claims.get("appid"))
        if role not in (WRITE_ROLES if write else READ_ROLES):
            raise Refusal(403, "AuthorizationPermissionMismatch", "This request is not authorized to perform this operation using this permission.")

    def check_writable(self, ws, path):
        """[PARITY]: OneLake protects the item folder and its first-level folders (Files, Tables) from
        creation, deletion and renaming; files and folders may be created only inside those managed
        folders. A mirrored database's Tables belong to the replicator (producers writing there is
        not documented: refused). The status and code of the refusal are not documented."""
        parts = path.split("/")
        if path == "" or len(parts) < 3 or parts[1] != "Files":
            raise Refusal(400, "OperationNotAllowedOnThePath", f"The operation is not allowed on path '{path}'.")

    def check_item(self, ws, path):
        if (ws, "") not in self.nodes:
            raise Refusal(404, "WorkspaceNotFound", "The workspace does not exist.")
        item = path.split("/")[0]
        if item and (ws, item) not in self.nodes:
            raise Refusal(404, "ArtifactNotFound", "The item does not exist.")

    def handle(self, method, raw_path, query, headers, body):
        """Returns (status, headers, body) or raises Refusal."""
        parsed = raw_path.split("/", 2)  # "", ws, path
        ws = urllib.parse.unquote(parsed[1]) if len(parsed) > 1 else ""
        path = urllib.parse.unquote(parsed[2]) if len(parsed) > 2 else ""
        path = path.rstrip("/")
        # [OS701]: the Blob API's batch request is refused by OneLake with this very reply.
        if query.get("comp") == "batch":
            raise Refusal(400, "BadRequest", "Either WorkspaceId or ArtifactId are missing in the request")
        if "comp" in query or "restype" in query or "x-ms-copy-source" in headers:
            # Put Block onto an existing blob: 409 BlobOperationNotSupported (seen on OneLake, issue
            # 14 of this project); Copy Blob and the rest of the Blob API: not documented for
            # OneLake, and not needed by a producer: refused.
            if query.get("comp") == "block":
                raise Refusal(409, "BlobOperationNotSupported", "The operation is not supported on this path.")
            raise Refusal(400, "UnsupportedOperation", "This OneLake stand-in serves the DFS API only.")
        write = method in ("PUT", "PATCH", "DELETE", "POST")
        self.authorize(ws, headers, write)
        with self.lock:
            self.check_item(ws, path)
            if path == "":
                # [PARITY]: "OneLake only allows HEAD calls at the workspace (container) level" (its
                # own example also lists a workspace).
                if method == "HEAD":
                    return 200, {"x-ms-resource-type": "directory"}, b""
                if method == "GET" and query.get("resource") == "filesystem":
                    return self.list(ws, query)
                raise Refusal(400, "OperationNotAllowedOnThePath", "Only HEAD and listing are allowed on a workspace.")
            if method == "HEAD":
                return self.head(ws, path)
            if method == "GET":
                return self.read(ws, path, headers)
            if method == "PUT":
                if "x-ms-rename-source" in headers:
                    return self.rename(ws, path, headers)
                return self.create(ws, path, query, headers)
            if method == "PATCH":
                action = query.get("action")
                if action == "append":
                    return self.append(ws, path, query, headers, body)
                if action == "flush":
                    return self.flush(ws, path, query, headers, body)
                raise Refusal(400, "InvalidQueryParameterValue", f"action={action} is not supported here.")
            if method == "DELETE":
                return self.delete(ws, path, query)
            raise Refusal(405, "UnsupportedHttpVerb", method)

    def parent_dir(self, ws, path):
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        node = self.nodes.get((ws, parent))
        return node if node is not None and node.is_dir else None

    def create(self, ws, path, query, headers):
        """[PATH-CREATE] resource=file|directory. If-None-Match: * fails with 409 PathAlreadyExists
        when the path exists; otherwise a file is overwritten. The parent must exist (automatic
        creation of parents is not documented: refused)."""
        resource = query.get("resource")
        if resource not in ("file", "directory"):
            raise Refusal(400, "InvalidQueryParameterValue", "resource must be file or directory.")
        self.check_writable(ws, path)
        if self.parent_dir(ws, path) is None:
            raise Refusal(404, "PathNotFound", "The parent directory does not exist.")
        existing = self.nodes.get((ws, path))
        if existing is not None:
            if headers.get("If-None-Match") == "*":
                raise Refusal(409, "PathAlreadyExists", "The specified path already exists.")
            if existing.is_dir != (resource == "directory"):
                raise Refusal(409, "PathConflict", "The specified path, or an element of the path, exists and its resource type is invalid for this operation.")
            if existing.is_dir:
                return 201, {"ETag": f'"{existing.etag}"'}, b""
        node = Node(resource == "directory")
        self.nodes[(ws, path)] = node
        return 201, {"ETag": f'"{node.etag}"', "Last-Modified": http_date(node.mtime)}, b""

    def rename(self, ws, path, headers):
        """[PATH-CREATE] rename: x-ms-rename-source "/{filesystem}/{path}", percent-encoded; 404
        SourcePathNotFound, 404 RenameDestinationParentPathNotFound, 409 PathAlreadyExists with
        If-None-Match: *, 409 InvalidRenameSourcePath for a destination under the source [SWAGGER].
        A destination file is overwritten without a condition. Properties (Content-MD5) move with
        the file."""
        source = headers["x-ms-rename-source"]
        if "?" in source:
            raise Refusal(400, "InvalidSourceUri", "SAS on the rename source is not supported by this stand-in.")
        parts = source.split("/", 2)
        if len(parts) < 3 or parts[0] != "" or urllib.parse.unquote(parts[1]) != ws:
            raise Refusal(400, "InvalidSourceUri", "The rename source must be a path of the same workspace.")
        src = urllib.parse.unquote(parts[2]).rstrip("/")
        self.check_writable(ws, src)
        self.check_writable(ws, path)
        node = self.nodes.get((ws, src))
        if node is None:
            raise Refusal(404, "SourcePathNotFound", "The source path for a rename operation does not exist.")
        if path == src or path.startswith(src + "/"):
            raise Refusal(409, "InvalidRenameSourcePath", "The source directory cannot be the same as the destination or a parent of it.")
        if self.parent_dir(ws, path) is None:
            raise Refusal(404, "RenameDestinationParentPathNotFound", "The parent directory of the destination path does not exist.")
        dest = self.nodes.get((ws, path))
        if dest is not None:
            if headers.get("If-None-Match") == "*":
                raise Refusal(409, "PathAlreadyExists", "The specified path already exists.")
            if dest.is_dir != node.is_dir:
                raise Refusal(409, "InvalidSourceOrDestinationResourceType", "The source and destination resource type must be identical.")
            if dest.is_dir and self.children(ws, path):
                raise Refusal(409, "PathAlreadyExists", "The destination directory is not empty.")
        moved = [(src, node)] + [(p, self.nodes[(ws, p)]) for p in self.descendants(ws, src)]
        for p, _ in moved:
            del self.nodes[(ws, p)]
        for p, n in moved:
            self.nodes[(ws, path + p[len(src):])] = n
        # Data appended but not flushed is not part of the file [PATH-UPDATE].
        node.pending = bytearray()
        return 201, {"ETag": f'"{node.etag}"'}, b""

    def append(self, ws, path, query, headers, body):
        """[PATH-UPDATE] action=append&position=N: the data must continue the file ("the previously
        uploaded data must be contiguous"); what a wrong position answers is not documented: 400."""
        self.check_writable(ws, path)
        node = self.nodes.get((ws, path))
        if node is None:
            raise Refusal(404, "PathNotFound", "The specified path does not exist.")
        if node.is_dir:
            raise Refusal(409, "InvalidAppendOperation", "The path is a directory.")
        if int(headers.get("Content-Length", "-1")) != len(body) or not body:
            raise Refusal(400, "InvalidInput", "Content-Length must be the length of the appended data.")
        position = int(query.get("position", "-1"))
        if position != len(node.data) + len(node.pending):
            raise Refusal(400, "InvalidFlushPosition", "The uploaded data is not contiguous or the position query parameter value is not equal to the length of the file after appending the uploaded data.")
        node.pending += body
        return 202, {}, b""

    def flush(self, ws, path, query, headers, body):
        """[PATH-UPDATE] action=flush&position=N: N is the file's length after all data; no body
        (400 ContentLengthMustBeZero); x-ms-content-md5 is stored (cleared when absent). The stand-in
        also checks it against the data (the service stores it as given: stricter)."""
        self.check_writable(ws, path)
        node = self.nodes.get((ws, path))
        if node is None:
            raise Refusal(404, "PathNotFound", "The specified path does not exist.")
        if body or headers.get("Content-Length", "0") != "0":
            raise Refusal(400, "ContentLengthMustBeZero", "The Content-Length request header must be 0 for a flush.")
        position = int(query.get("position", "-1"))
        data = node.data + bytes(node.pending)
        if position != len(data):
            raise Refusal(400, "InvalidFlushPosition", "The uploaded data is not contiguous or the position query parameter value is not equal to the length of the file after appending the uploaded data.")
        md5 = headers.get("x-ms-content-md5")
        if md5 is not None and base64.b64decode(md5) != hashlib.md5(data).digest():
            raise Refusal(400, "Md5Mismatch", "The MD5 value specified in the request did not match the MD5 value calculated by the server.")
        node.data, node.pending, node.md5 = data, bytearray(), md5
        node.touch()
        return 200, {"ETag": f'"{node.etag}"', "Content-Length": "0"}, b""

    def delete(self, ws, path, query):
        """[PATH-DELETE]: a directory with children needs recursive=true (else 409 DirectoryNotEmpty);
        a recursive delete may be paginated: x-ms-continuation is returned until everything is gone;
        404 PathNotFound."""
        self.check_writable(ws, path)
        node = self.nodes.get((ws, path))
        if node is None:
            raise Refusal(404, "PathNotFound", "The specified path does not exist.")
        if not node.is_dir:
            del self.nodes[(ws, path)]
            return 200, {}, b""
        below = self.descendants(ws, path)
        if below and query.get("recursive") != "true":
            raise Refusal(409, "DirectoryNotEmpty", "The recursive query parameter value must be true to delete a non-empty directory.")
        for p in below[: self.page_size]:
            del self.nodes[(ws, p)]
        if len(below) > self.page_size:
            return 200, {"x-ms-continuation": b64url(os.urandom(12))}, b""
        del self.nodes[(ws, path)]
        return 200, {}, b""

    def head(self, ws, path):
        """[PATH-HEAD]: x-ms-resource-type, Content-Length, ETag, Last-Modified, Content-MD5 if set."""
        node = self.nodes.get((ws, path))
        if node is None:
            raise Refusal(404, "PathNotFound", "The specified path does not exist.")
        h = {"x-ms-resource-type": "directory" if node.is_dir else "file", "ETag": f'"{node.etag}"',
             "Last-Modified": http_date(node.mtime), "Content-Length": str(0 if node.is_dir else len(node.data))}
        if node.md5:
            h["Content-MD5"] = node.md5
        return 200, h, b""

    def read(self, ws, path, headers):
        node = self.nodes.get((ws, path))
        if node is None:
            raise Refusal(404, "PathNotFound", "The specified path does not exist.")
        if node.is_dir:
            raise Refusal(400, "InvalidInput", "The path is a directory.")
        h = {"ETag": f'"{node.etag}"', "Last-Modified": http_date(node.mtime)}
        rng = headers.get("Range")
        if rng is None:
            return 200, h, node.data
        # [PATH-READ] Range, in the forms the storage services document (bytes=start-end and
        # bytes=start-; learn.microsoft.com/rest/api/storageservices/specifying-the-range-header-for-
        # file-service-operations). Suffix ranges (bytes=-N) are not documented: refused here. A start
        # at or past the end is 416 InvalidRange; the reply is 206 with Content-Range.
        spec = rng[len("bytes="):] if rng.startswith("bytes=") else ""
        first, _, last = spec.partition("-")
        if not first.isdigit() or (last and not last.isdigit()) or "," in spec:
            raise Refusal(400, "InvalidHeaderValue", "The value for one of the HTTP headers is not in the correct format.")
        start, size = int(first), len(node.data)
        end = min(int(last), size - 1) if last else size - 1
        if start >= size or end < start:
            raise Refusal(416, "InvalidRange", "The range specified is invalid for the current size of the resource.")
        h["Content-Range"] = f"bytes {start}-{end}/{size}"
        return 206, h, bytes(node.data[start:end + 1])

    def list(self, ws, query):
        """[PATH-LIST] GET ?resource=filesystem&recursive=…&directory=…: recursive is required; a
        missing directory is 404; pages of at most maxResults with x-ms-continuation. Entries as the
        service writes them (its replies, not the specification): contentLength a string,
        isDirectory "true" only for directories, etag unquoted, names relative to the file system."""
        if query.get("recursive") not in ("true", "false"):
            raise Refusal(400, "MissingRequiredQueryParameter", "recursive is required.")
        directory = query.get("directory", "").strip("/")
        if directory:
            node = self.nodes.get((ws, directory))
            if node is None or not node.is_dir:
                raise Refusal(404, "PathNotFound", "The specified path does not exist.")
        if query["recursive"] == "true":
            prefix = directory + "/" if directory else ""
            names = sorted(p for (w, p) in self.nodes if w == ws and p.startswith(prefix) and p)
        else:
            names = [(directory + "/" + c if directory else c) for c in self.children(ws, directory)]
        start = 0
        if "continuation" in query:
            start = int(b64url_decode(query["continuation"]).decode())
        size = min(int(query.get("maxResults", "5000")), 5000, self.page_size)
        page = names[start:start + size]
        paths = []
        for p in page:
            n = self.nodes[(ws, p)]
            e = {"name": p, "contentLength": str(0 if n.is_dir else len(n.data)), "etag": n.etag,
                 "lastModified": http_date(n.mtime), "owner": "$superuser", "group": "$superuser",
                 "permissions": "---------"}
            if n.is_dir:
                e["isDirectory"] = "true"
            paths.append(e)
        h = {"Content-Type": "application/json;charset=utf-8"}
        if start + size < len(names):
            h["x-ms-continuation"] = b64url(str(start + size).encode())
        return 200, h, json.dumps({"paths": paths}).encode()

    def issue_token(self, tenant, form):
        """[ENTRA] client credentials grant: POST {authority}/{tenant}/oauth2/v2.0/token with
        client_id, client_secret, scope, grant_type=client_credentials. A wrong secret is 401
        invalid_client (AADSTS7000215)."""
        def refuse(status, error, description):
            return status, {"Content-Type": "application/json"}, json.dumps(
                {"error": error, "error_description": description}).encode()

        if form.get("grant_type") != "client_credentials":
            return refuse(400, "unsupported_grant_type", "AADSTS70003: the grant type is not supported.")
        if form.get("scope") != "https://storage.azure.com/.default":
            return refuse(400, "invalid_scope", "AADSTS70011: the scope is not valid for this stand-in.")
        if "client_assertion" in form:
            # Workload identity federation: the assertion is the platform's token, which must be
            # signed by the trusted issuer, for api://AzureADTokenExchange, unexpired, and name the
            # subject of the app's federated credential.
            subject = self.federated.get(form.get("client_id", ""))
            try:
                if form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
                    raise ValueError("assertion type")
                head, body, sig = form["client_assertion"].strip().split(".")
                want = hmac.new(self.federation_key, f"{head}.{body}".encode(), hashlib.sha256).digest()
                claims = json.loads(b64url_decode(body))
                if (not hmac.compare_digest(want, b64url_decode(sig)) or claims.get("aud") != "api://AzureADTokenExchange"
                        or claims.get("sub") != subject or claims.get("exp", 0) < time.time() or tenant != self.tenant):
                    raise ValueError("assertion")
            except Exception:
                return refuse(401, "invalid_client", "AADSTS70021: No matching federated identity record found for presented assertion.")
            return 200, {"Content-Type": "application/json"}, json.dumps({
                "token_type": "Bearer", "expires_in": 3599, "access_token": self.token(form["client_id"])}).encode()
        known = self.principals.get(form.get("client_id", ""))
        if known is None or known[0] != tenant:
            return refuse(400, "unauthorized_client", "AADSTS700016: application not found in the directory.")
        if not hmac.compare_digest(known[1], form.get("client_secret", "")):
            return refuse(401, "invalid_client", "AADSTS7000215: Invalid client secret provided.")
        return 200, {"Content-Type": "application/json"}, json.dumps({
            "token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
            "access_token": self.token(form["client_id"])}).encode()

    def issue_managed_token(self, query, headers):
        """The instance metadata service's token endpoint (GET ...?api-version=2019-08-01&resource=
        https://storage.azure.com[&client_id=...], header Metadata: true); expires_on is a string of
        epoch seconds (learn.microsoft.com/entra/identity/managed-identities-azure-resources/
        how-to-use-vm-token)."""
        def refuse(status, error, description):
            return status, {"Content-Type": "application/json"}, json.dumps(
                {"error": error, "error_description": description}).encode()

        if headers.get("Metadata", headers.get("metadata")) != "true":
            return refuse(400, "invalid_request", "Required metadata header not specified")
        if query.get("resource", "").rstrip("/") != "https://storage.azure.com":
            return refuse(400, "invalid_resource", "The resource is not valid for this stand-in.")
        client_id = query.get("client_id")
        if client_id not in self.managed:
            return refuse(400, "invalid_request", "Identity not found")
        return 200, {"Content-Type": "application/json"}, json.dumps({
            "access_token": self.token(client_id), "expires_on": str(int(time.time()) + 3599),
            "resource": "https://storage.azure.com", "token_type": "Bearer"}).encode()

    def take_fault(self, method, path, query, headers):
        with self.lock:
            for i, (pred, mode) in enumerate(self.faults):
                if pred(method, path, query, headers):
                    del self.faults[i]
                    return mode
        if self.failure_rate and random.random() < self.failure_rate:
            return "503"
        return None


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    emulator = None

    def log_message(self, *args):
        pass

    def _serve(self, method):
        em = self.emulator
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        headers = {k: v for k, v in self.headers.items()}
        # Header names are case-insensitive; look-ups above use these spellings.
        for k in list(headers):
            for want in ("Authorization", "If-None-Match", "Content-Length", "x-ms-version", "x-ms-rename-source",
                         "x-ms-content-md5", "x-ms-copy-source", "Range"):
                if k.lower() == want.lower():
                    headers[want] = headers.pop(k)
        if em.partitioned:
            # The request never reaches the service: the client waits for an answer that does not
            # come; when the partition ends the connection is closed without one.
            with em.lock:
                em.hanging += 1
            while em.partitioned:
                time.sleep(0.05)
            self.close_connection = True
            return
        if em.stalls and any(p(method, url.path, query, headers) for p in list(em.stalls)):
            with em.lock:
                em.hanging += 1
            em.released.wait()
        if em.latency_s:
            time.sleep(em.latency_s)
        if method == "GET" and url.path == "/metadata/identity/oauth2/token":
            status, h, out = em.issue_managed_token(query, headers)
            return self._reply(status, h, out, method)
        if method == "POST" and url.path.endswith("/oauth2/v2.0/token"):
            tenant = url.path.strip("/").split("/")[0]
            status, h, out = em.issue_token(tenant, dict(urllib.parse.parse_qsl(body.decode())))
            return self._reply(status, h, out, method)
        kind = query.get("action") or query.get("resource") or ("rename" if "x-ms-rename-source" in headers else "")
        with em.lock:
            em.counts[(method, kind)] += 1
        fault = em.take_fault(method, url.path, query, headers)
        if fault == "503":
            return self._reply(503, {"x-ms-error-code": "ServerBusy"},
                               json.dumps({"error": {"code": "ServerBusy", "message": "The server is busy."}}).encode(), method)
        try:
            status, h, out = em.handle(method, url.path, query, headers, body)
        except Refusal as r:
            status, h = r.status, {**r.headers, "x-ms-error-code": r.code, "Content-Type": "application/json;charset=utf-8"}
            out = b"" if method == "HEAD" else json.dumps(
                {"error": {"code": r.code, "message": f"{r.message}\nRequestId:{uuid.uuid4()}\nTime:{http_date(time.time())}"}}).encode()
        if fault == "lost":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self._reply(status, h, out, method)

    def _reply(self, status, headers, body, method):
        self.send_response(status)
        headers = dict(headers)
        headers.setdefault("x-ms-request-id", str(uuid.uuid4()))
        headers.setdefault("x-ms-version", "2023-11-03")
        for k, v in headers.items():
            if k.lower() != "content-length":
                self.send_header(k, v)
        if method == "HEAD":
            self.send_header("Content-Length", headers.get("Content-Length", "0"))
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)

    def do_HEAD(self):
        self._serve("HEAD")

    def do_GET(self):
        self._serve("GET")

    def do_PUT(self):
        self._serve("PUT")

    def do_PATCH(self):
        self._serve("PATCH")

    def do_DELETE(self):
        self._serve("DELETE")

    def do_POST(self):
        self._serve("POST")


# ---- Fabric's replicator -----------------------------------------------------------------------

class ReplicatedTable(Replayed):
    """A table of the mirrored database, as the replicator built it."""

    def __init__(self, keys, etag):
        super().__init__(keys)
        self.etag = etag  # of the landing-zone folder it was built from
        self.next = 1
        self.types = {}
        self.kept = None  # (number, etag) of the newest file, left in place [LZ]
        self.failed = None
        self.serial = 0
        self.first_applied = None  # when its first file was applied
        self.visible = False  # its Tables/<schema>/<table> folder exists


class Replicator:
    """Fabric's open-mirroring replicator for one mirrored database, by the documented rules, reading
    the landing zone while the mirror runs:

    - tables are the `<schema>.schema/<table>` folders; names starting with `_` are ignored [BP];
    - a table starts when its folder has `_metadata.json` [LZ: "Every table folder must contain a
      _metadata.json file"]; keyColumns never change [LZ: "once added keyColumns can't be changed"];
    - data files are applied strictly in number order from 1; a gap blocks the table [BP: "A missing
      index blocks detection of later files"]; a number below the next expected is never applied
      (and is a violation: "don't skip, reuse, or regress an index" [BP]);
    - __rowMarker__ is the last column; 0 insert (no duplicate-key check in Fabric: a duplicate is a
      violation here), 1 update, 2 delete, 4 upsert [LZ]; without it every row is an insert; a file
      without a column gives NULL; a new column is added; a changed type stops the table [LZ];
    - processed files move to `_ProcessedFiles`, the newest stays in place [LZ]; after
      `ready_after_s` they move to `_FilesReadyToDelete`, after `purge_after_s` they are deleted
      ("After seven days, the files are removed" [LZ]);
    - a table appears in `Tables/<schema>/<table>` `create_delay_s` after its first file was applied;
      a deleted folder drops the table after `drop_delay_s` (that folder goes); a folder recreated (a
      new ETag) drops and rebuilds the table [LZ]; recreating it before the replicator has dropped
      the table, visible or still loading, is a violation [BP: "Wait until the table disappears
      from the mirrored database"].

    `violations` lists every breach of the producer's side of the contract; tests require none."""

    def __init__(self, emulator, ws, item, interval_s=0.1, drop_delay_s=1.0, ready_after_s=3600.0,
                 purge_after_s=7 * 86400.0, create_delay_s=0.0):
        self.em, self.ws, self.item = emulator, ws, item
        self.root = f"{item}/Files/LandingZone"
        self.interval_s, self.drop_delay_s = interval_s, drop_delay_s
        self.ready_after_s, self.purge_after_s = ready_after_s, purge_after_s
        # A table shows in Tables/ only this long after its first file was applied (a first load
        # takes time); until then a producer cannot see that the replicator is reading the folder.
        self.create_delay_s = create_delay_s
        self.tables = {}  # (schema folder, table folder) -> ReplicatedTable
        self.dropping = {}  # (schema folder, table folder) -> time the folder was seen gone
        self.moved = {}  # path in _ProcessedFiles / _FilesReadyToDelete -> time moved there
        self.violations = []
        self.applied = 0
        self.paused = False  # tests: the replicator stops reading (Fabric's replication paused)
        self.stopping = threading.Event()
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping.set()
        if self.thread:
            self.thread.join(10)

    def _run(self):
        while not self.stopping.is_set():
            try:
                with self.em.lock:
                    if not self.paused:
                        self.poll()
            except Exception as e:  # a bug here must fail the tests, not hang them
                self.violations.append(f"replicator error: {e!r}")
            self.stopping.wait(self.interval_s)

    def violation(self, what):
        self.violations.append(what)

    def table(self, schema_folder, table_folder):
        with self.em.lock:
            return self.tables.get((schema_folder, table_folder))

    def tables_path(self, key):
        return f"{self.item}/Tables/{key[0][:-len('.schema')]}/{key[1]}"

    def poll(self):
        em, ws = self.em, self.ws
        seen = set()
        if em.get(ws, self.root) is None:
            return
        for s in em.children(ws, self.root):
            if s.startswith("_") or not s.endswith(".schema") or not em.get(ws, f"{self.root}/{s}").is_dir:
                continue
            for t in em.children(ws, f"{self.root}/{s}"):
                node = em.get(ws, f"{self.root}/{s}/{t}")
                if t.startswith("_") or not node.is_dir:
                    continue
                seen.add((s, t))
                self.table_folder((s, t), node)
        now = time.time()
        for key in list(self.tables):
            if key not in seen and key not in self.dropping:
                self.dropping[key] = now
        for key, since in list(self.dropping.items()):
            if now - since >= self.drop_delay_s:
                self.drop(key)
        self.age_moved(now)

    def drop(self, key):
        """The table leaves the mirrored database: its Tables folder goes."""
        self.tables.pop(key, None)
        self.dropping.pop(key, None)
        path = self.tables_path(key)
        for p in self.em.descendants(self.ws, path) + [path]:
            self.em.nodes.pop((self.ws, p), None)

    def table_folder(self, key, node):
        em, ws = self.em, self.ws
        folder = f"{self.root}/{key[0]}/{key[1]}"
        t = self.tables.get(key)
        if t is not None and t.etag != node.etag:
            self.violation(f"{folder}: the folder was recreated before the table left the mirrored database")
            self.drop(key)
            t = None
        elif t is None and em.get(ws, self.tables_path(key)) is not None:
            self.violation(f"{folder}: a new folder while the mirrored database still holds the table")
        meta = em.get(ws, f"{folder}/_metadata.json")
        if meta is None:
            return
        keys = json.loads(meta.data or b"{}").get("keyColumns", [])
        if t is None:
            t = self.tables[key] = ReplicatedTable(keys, node.etag)
        elif keys != t.keys:
            self.violation(f"{folder}: keyColumns changed from {t.keys} to {keys}")
        if t.failed:
            return
        files = {}
        for name in em.children(ws, folder):
            if len(name) == 28 and name.endswith(".parquet") and name[:20].isdigit():
                files[int(name[:20])] = em.get(ws, f"{folder}/{name}")
        for n, f in files.items():
            if n < t.next and (t.kept is None or (n, f.etag) != t.kept):
                self.violation(f"{folder}: file {n} appeared below the next expected number {t.next}")
        while t.next in files:
            f = files[t.next]
            try:
                self.apply(t, folder, t.next, f.data)
            except Exception as e:
                t.failed = f"file {t.next}: {e}"
                self.violation(f"{folder}: replication stopped: {t.failed}")
                return
            self.applied += 1
            t.kept = (t.next, f.etag)
            t.next += 1
            if t.first_applied is None:
                t.first_applied = time.time()
        if not t.visible and t.first_applied is not None and time.time() - t.first_applied >= self.create_delay_s:
            tp = self.tables_path(key)
            schema_dir = tp.rsplit("/", 1)[0]
            if em.get(ws, schema_dir) is None:
                em.put_internal(ws, schema_dir, Node(True))
            em.put_internal(ws, tp, Node(True))
            t.visible = True
        # Processed files move to _ProcessedFiles; the newest stays in place [LZ].
        for n in sorted(files):
            if n < t.next - 1:
                self.move(folder, "_ProcessedFiles", "%020d.parquet" % n)

    def move(self, folder, to, name, source=None):
        """Moves file `name` of table folder `folder` (or of its subfolder `source`) into subfolder `to`."""
        em, ws = self.em, self.ws
        dest_dir = f"{folder}/{to}"
        if em.get(ws, dest_dir) is None:
            em.put_internal(ws, dest_dir, Node(True))
        node = em.nodes.pop((ws, f"{folder}/{source}/{name}" if source else f"{folder}/{name}"))
        em.put_internal(ws, f"{dest_dir}/{name}", node)
        self.moved[f"{dest_dir}/{name}"] = time.time()

    def age_moved(self, now):
        em, ws = self.em, self.ws
        for path, since in list(self.moved.items()):
            folder, sub, name = path.rsplit("/", 2)
            if em.get(ws, path) is None:
                self.moved.pop(path)
            elif sub == "_ProcessedFiles" and now - since >= self.ready_after_s:
                self.moved.pop(path)
                self.move(folder, "_FilesReadyToDelete", name, source="_ProcessedFiles")
            elif sub == "_FilesReadyToDelete" and now - since >= self.purge_after_s:
                self.moved.pop(path)
                em.nodes.pop((ws, path), None)

    def apply(self, t, folder, number, data):
        table = pq.read_table(io.BytesIO(data))
        if table.num_rows == 0:
            raise ValueError("empty file")
        names = table.column_names
        if ROW_MARKER in names and names[-1] != ROW_MARKER:
            raise ValueError("__rowMarker__ is not the last column")
        cols = [n for n in names if n != ROW_MARKER]
        for n in cols:
            typ = table.schema.field(n).type
            if n in t.types and t.types[n] != typ:
                raise ValueError(f"column {n} changed type from {t.types[n]} to {typ}")
            t.types.setdefault(n, typ)
            if n not in t.columns:
                t.columns.append(n)
        values = {n: column_as_text(table.column(n)) for n in cols}
        markers = table.column(ROW_MARKER).to_pylist() if ROW_MARKER in names else [0] * table.num_rows
        where = f"{folder}/{'%020d' % number}"
        for i, marker in enumerate(markers):
            row = {**{c: None for c in t.columns}, **{n: values[n][i] for n in cols}}
            if t.keys:
                k = tuple(row[c] for c in t.keys)
            elif marker in (0, 4):
                k, t.serial = t.serial, t.serial + 1
            else:
                self.violation(f"{where}: row marker {marker} in a table without key columns")
                continue
            if marker == 0:
                if k in t.rows:
                    self.violation(f"{where}: insert of existing key {k} (Fabric would hold it twice)")
                t.rows[k] = row
            elif marker == 1:
                if k not in t.rows:
                    self.violation(f"{where}: update of missing key {k}")
                t.rows[k] = row
            elif marker == 2:
                if t.rows.pop(k, None) is None:
                    self.violation(f"{where}: delete of missing key {k}")
            elif marker == 4:
                t.rows[k] = row
            else:
                raise ValueError(f"unknown row marker {marker}")
        t.files += 1
