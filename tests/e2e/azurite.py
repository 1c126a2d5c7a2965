"""Azurite, the Azure Blob Storage emulator, for the object-store tests: started on 127.0.0.1 with a
temporary folder, stopped and restarted on demand (outages), and a reader that copies a landing zone
from a container into a local folder so that the replay helper can check it."""

import os
import shutil
import socket
import subprocess
import tempfile
import time

from azure.storage.blob import BlobServiceClient

ACCOUNT = "devstoreaccount1"
# Azurite's published development key (the emulator accepts only this one).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
PORT = int(os.environ.get("AZURE_CDC_AZURITE_PORT", "10400"))
ENDPOINT = f"http://127.0.0.1:{PORT}/{ACCOUNT}"


class Azurite:
    def __init__(self):
        self.location = tempfile.mkdtemp(prefix="azure_cdc_azurite_")
        self.proc = None
        self.log = open(os.path.join(self.location, "azurite.out"), "w")

    def start(self):
        self.proc = subprocess.Popen(
            ["azurite-blob", "--silent", "--skipApiVersionCheck", "--location", self.location,
             "--blobHost", "127.0.0.1", "--blobPort", str(PORT)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        end = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None, "azurite exited"
                assert time.time() < end, "azurite did not start"
                time.sleep(0.2)

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None

    def close(self):
        self.stop()
        self.log.close()
        shutil.rmtree(self.location, ignore_errors=True)

    def service(self):
        return BlobServiceClient(account_url=ENDPOINT, credential={"account_name": ACCOUNT, "account_key": KEY})

    def create_container(self, name):
        self.service().create_container(name)

    def credential_options(self, **overrides):
        """Options of an azure_cdc credential for this emulator."""
        o = {"account_name": ACCOUNT, "account_key": KEY, "endpoint": ENDPOINT, "allow_http": "true"}
        o.update(overrides)
        return {k: v for k, v in o.items() if v is not None}

    def blob_names(self, container, prefix=""):
        cc = self.service().get_container_client(container)
        return sorted(b.name for b in cc.list_blobs(name_starts_with=prefix))

    def download(self, container, prefix, dest):
        """Copies every object under `prefix` into folder `dest` (same relative names); returns dest."""
        cc = self.service().get_container_client(container)
        prefix = prefix.rstrip("/") + "/"
        for b in cc.list_blobs(name_starts_with=prefix):
            path = os.path.join(dest, b.name[len(prefix):])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(cc.download_blob(b.name).readall())
        return dest
