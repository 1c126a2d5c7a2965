"""The object stores the target tests run against, each started by the tests on 127.0.0.1, with a
way to cut it off (an outage) and to copy a landing zone into a local folder for the replay helper:

- Azurite, the Azure Blob Storage emulator (npm), stopped and started again (it keeps its data);
- moto's server (PyPI), Amazon S3 with IAM authentication and authorization enforced: a writer
  and a read-only user with their own access keys, any other key refused (as S3 does);
- gcs.GcsStandIn, Google Cloud Storage's XML API (see gcs.py for why it is our own).

moto and the GCS stand-in keep their data in memory: an outage closes the front proxy, which
refuses connections (as an unreachable endpoint does) while the store keeps its objects."""

import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from azure.storage.blob import BlobServiceClient

from gcs import GcsStandIn

BASE_PORT = int(os.environ.get("AZURE_CDC_STORE_PORT", "10400"))


def wait_port(port, proc=None, deadline_s=60):
    end = time.time() + deadline_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc is None or proc.poll() is None, "the store's process exited"
            assert time.time() < end, f"nothing listens on port {port}"
            time.sleep(0.2)


class Proxy:
    """A TCP front for a store on 127.0.0.1: `down()` closes it (new connections are refused, open
    ones are cut), `up()` opens it again."""

    def __init__(self, port, backend_port):
        self.port = port
        self.backend = backend_port
        self.listener = None
        self.conns = []
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = None

    def up(self):
        # (create_server sets SO_REUSEADDR: the port can be opened again right after down())
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def down(self):
        self.stopping = True
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        with self.lock:
            for s in self.conns:
                try:
                    s.close()
                except OSError:
                    pass
            self.conns = []
        if self.thread is not None:
            self.thread.join(5)

    def _accept(self):
        lst = self.listener
        while not self.stopping:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.backend))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, a, b):
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while not self.stopping:
                for key, _ in sel.select(timeout=0.5):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass


class Azurite:
    name = "azurite"
    ACCOUNT = "devstoreaccount1"
    # Azurite's published development key (the emulator accepts only this one).
    KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

    def __init__(self, port=BASE_PORT):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}/{self.ACCOUNT}"
        self.location = tempfile.mkdtemp(prefix="azure_cdc_azurite_")
        self.proc = None
        self.log = open(os.path.join(self.location, "azurite.out"), "w")

    def start(self):
        self.proc = subprocess.Popen(
            ["azurite-blob", "--silent", "--skipApiVersionCheck", "--location", self.location,
             "--blobHost", "127.0.0.1", "--blobPort", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_port(self.port, self.proc)

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None

    def close(self):
        self.stop()
        self.log.close()
        shutil.rmtree(self.location, ignore_errors=True)

    # An outage: the emulator stops; it keeps its data on disk.
    def down(self):
        self.stop()

    def up(self):
        self.start()

    def service(self):
        return BlobServiceClient(account_url=self.endpoint, credential={"account_name": self.ACCOUNT, "account_key": self.KEY})

    def create_bucket(self, name):
        self.service().create_container(name)

    create_container = create_bucket

    def url(self, bucket, prefix):
        return f"az://{bucket}/{prefix}"

    def credential_options(self, **overrides):
        """Options of an azure_cdc credential for this emulator."""
        o = {"account_name": self.ACCOUNT, "account_key": self.KEY, "endpoint": self.endpoint, "allow_http": "true"}
        o.update(overrides)
        return {k: v for k, v in o.items() if v is not None}

    def object_names(self, bucket, prefix=""):
        cc = self.service().get_container_client(bucket)
        return sorted(b.name for b in cc.list_blobs(name_starts_with=prefix))

    blob_names = object_names

    def download(self, bucket, prefix, dest):
        """Copies every object under `prefix` into folder `dest` (same relative names); returns dest."""
        cc = self.service().get_container_client(bucket)
        prefix = prefix.rstrip("/") + "/"
        for b in cc.list_blobs(name_starts_with=prefix):
            path = os.path.join(dest, b.name[len(prefix):])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(cc.download_blob(b.name).readall())
        return dest


class MotoS3:
    """Amazon S3 (moto's server) behind a proxy, with IAM authentication and authorization enforced
    once its users exist: a request signed with an unknown key or a wrong secret is refused
    (InvalidAccessKeyId / SignatureDoesNotMatch), one the user's policy does not allow is AccessDenied."""

    name = "s3"
    REGION = "us-east-1"

    def __init__(self, port=BASE_PORT + 1, backend_port=BASE_PORT + 11):
        self.port = port
        self.backend_port = backend_port
        self.proc = None
        self.proxy = Proxy(port, backend_port)
        self.keys = {}

    def start(self):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "moto_server.py"),
                                      str(self.backend_port)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.backend_port, self.proc)
        import boto3
        iam = boto3.client("iam", endpoint_url=f"http://127.0.0.1:{self.backend_port}", region_name=self.REGION,
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        for user, actions in [("writer", ["s3:*"]), ("reader", ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"])]:
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="lake", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            k = iam.create_access_key(UserName=user)["AccessKey"]
            self.keys[user] = (k["AccessKeyId"], k["SecretAccessKey"])
        # From now on every request is authenticated and authorized.
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{self.backend_port}/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "text/plain"})).read()
        self.proxy.up()

    def close(self):
        self.proxy.down()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)

    def down(self):
        self.proxy.down()

    def up(self):
        self.proxy.up()

    def client(self, user="writer"):
        import boto3
        key, secret = self.keys[user]
        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.backend_port}", region_name=self.REGION,
                            aws_access_key_id=key, aws_secret_access_key=secret)

    def create_bucket(self, name):
        self.client().create_bucket(Bucket=name)

    def url(self, bucket, prefix):
        return f"s3://{bucket}/{prefix}"

    def credential_options(self, user="writer", **overrides):
        key, secret = self.keys[user]
        o = {"access_key_id": key, "secret_access_key": secret, "region": self.REGION,
             "endpoint": f"http://127.0.0.1:{self.port}", "allow_http": "true"}
        o.update(overrides)
        return {k: v for k, v in o.items() if v is not None}

    def refused_options(self):
        """A key S3 does not accept: the writer's id with a wrong secret."""
        return self.credential_options(secret_access_key="V3JvbmdTZWNyZXRXcm9uZ1NlY3JldFdyb25nU2Vj")

    def read_only_options(self):
        return self.credential_options(user="reader")

    def object_names(self, bucket, prefix=""):
        names, token = [], None
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            r = self.client().list_objects_v2(**kw)
            names += [o["Key"] for o in r.get("Contents", [])]
            token = r.get("NextContinuationToken")
            if not token:
                return sorted(names)

    def download(self, bucket, prefix, dest):
        prefix = prefix.rstrip("/") + "/"
        c = self.client()
        for name in self.object_names(bucket, prefix):
            path = os.path.join(dest, name[len(prefix):])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(c.get_object(Bucket=bucket, Key=name)["Body"].read())
        return dest


class Gcs:
    """Google Cloud Storage (gcs.GcsStandIn) behind a proxy: a writer and a read-only service
    account; any other key's tokens are refused."""

    name = "gcs"

    def __init__(self, port=BASE_PORT + 2, backend_port=BASE_PORT + 12):
        self.port = port
        self.standin = GcsStandIn(backend_port)
        self.proxy = Proxy(port, backend_port)
        self.accounts = {}

    def start(self):
        self.accounts = {r: self.standin.add_principal(f"{r}@lake-project.iam.gserviceaccount.com", r)
                         for r in ("writer", "reader")}
        self.standin.start()
        self.proxy.up()

    def close(self):
        self.proxy.down()
        self.standin.stop()

    def down(self):
        self.proxy.down()

    def up(self):
        self.proxy.up()

    def create_bucket(self, name):
        self.standin.create_bucket(name)

    def url(self, bucket, prefix):
        return f"gs://{bucket}/{prefix}"

    def credential_options(self, user="writer", **overrides):
        o = {"service_account_key": json.dumps(self.accounts[user]), "endpoint": f"http://127.0.0.1:{self.port}",
             "allow_http": "true"}
        o.update(overrides)
        return {k: v for k, v in o.items() if v is not None}

    def refused_options(self):
        """A service account key GCS does not know: its tokens are refused."""
        from gcs import new_service_account
        sa, _ = new_service_account("writer@lake-project.iam.gserviceaccount.com")
        return self.credential_options(service_account_key=json.dumps(sa))

    def read_only_options(self):
        return self.credential_options(user="reader")

    def object_names(self, bucket, prefix=""):
        return self.standin.names(bucket, prefix)

    def download(self, bucket, prefix, dest):
        prefix = prefix.rstrip("/") + "/"
        for name in self.object_names(bucket, prefix):
            path = os.path.join(dest, name[len(prefix):])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(self.standin.read(bucket, name))
        return dest


class OneLake:
    """OneLake (onelake.OneLakeEmulator, in this process) behind a proxy: a workspace per "bucket",
    each with one mirrored database whose Files/LandingZone is the target (whatever prefix a test
    names: OneLake's landing zone is always that folder). A writer service principal (Contributor)
    and a reader (Viewer) get their tokens from the emulator's Entra endpoint, which stays reachable
    during an outage of the storage endpoint (they are different services)."""

    name = "onelake"
    ITEM = "sales.MountedRelationalDatabase"
    HOST = "onelake.dfs.fabric.microsoft.com"

    def __init__(self, port=BASE_PORT + 3, backend_port=BASE_PORT + 13, latency_s=0.0):
        from onelake import OneLakeEmulator
        self.port = port
        self.emulator = OneLakeEmulator(backend_port, latency_s=latency_s)
        self.proxy = Proxy(port, backend_port)
        self.principals = {}
        self.replicators = []

    def start(self):
        self.emulator.start()
        self.principals = {"writer": self.emulator.add_principal({}), "reader": self.emulator.add_principal({})}
        self.proxy.up()

    def close(self):
        for r in self.replicators:
            r.stop()
        self.proxy.down()
        self.emulator.stop()

    def down(self):
        self.proxy.down()

    def up(self):
        self.proxy.up()

    def create_bucket(self, name):
        self.emulator.add_workspace(name)
        self.emulator.add_mirrored_database(name, self.ITEM)
        self.emulator.grant(name, self.principals["writer"]["client_id"], "Contributor")
        self.emulator.grant(name, self.principals["reader"]["client_id"], "Viewer")

    def url(self, bucket, prefix=None):
        return f"abfss://{bucket}@{self.HOST}/{self.ITEM}/Files/LandingZone"

    def credential_options(self, user="writer", **overrides):
        o = {**self.principals[user], "endpoint": f"http://127.0.0.1:{self.port}", "allow_http": "true"}
        o.update(overrides)
        return {k: v for k, v in o.items() if v is not None}

    def refused_options(self):
        """The writer's client id with a secret Entra does not accept."""
        return self.credential_options(client_secret="V3JvbmdTZWNyZXRXcm9uZ1NlY3JldA")

    def read_only_options(self):
        return self.credential_options(user="reader")

    @property
    def root(self):
        return f"{self.ITEM}/Files/LandingZone"

    def object_names(self, bucket, prefix=""):
        """Files of the landing zone, named as if the landing zone were `prefix`."""
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        return sorted(prefix + n[len(self.root) + 1:] for n in self.emulator.names(bucket, self.root + "/"))

    def download(self, bucket, prefix, dest):
        for name in self.emulator.names(bucket, self.root + "/"):
            path = os.path.join(dest, name[len(self.root) + 1:])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(self.emulator.get(bucket, name).data)
        return dest

    def replicator(self, bucket, **kw):
        """Starts Fabric's replicator (onelake.Replicator) on the bucket's mirrored database."""
        from onelake import Replicator
        r = Replicator(self.emulator, bucket, self.ITEM, **kw)
        r.start()
        self.replicators.append(r)
        return r
