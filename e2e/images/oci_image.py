#!/usr/bin/env python3
"""Writes a container image as an OCI image-layout tar, without Docker or a registry.

The local cluster's real node runs containerd, and nothing here can pull from a registry, so
its images are built from files on this machine and imported with `ctr images import`. One
uncompressed layer holds the given files, the shared libraries they load (found with ldd,
at the paths the dynamic loader looks them up), an /etc/passwd and /etc/group that know the
non-root user 65532, the machine's CA certificates and a writable /tmp. The layer is
reproducible: fixed timestamps and owners, entries in sorted order.

    oci_image.py --name docker.io/kubetune/server:0.1.0 --out server.tar \
        --file target/debug/kubetune-server:/usr/local/bin/kubetune-server \
        --entrypoint /usr/local/bin/kubetune-server --user 65532:65532
"""

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile

NONROOT = 65532
PASSWD = f"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n"
GROUP = f"root:x:0:\nnonroot:x:{NONROOT}:\n"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")


def shared_libraries(path):
    """The libraries (and the loader) a dynamically linked file needs; none for a static one."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True)
    if out.returncode != 0:
        # ldd says "not a dynamic executable" and fails for static binaries and scripts.
        return []
    libs = []
    for line in out.stdout.splitlines():
        if "not found" in line:
            sys.exit(f"{path}: needs a library this machine lacks: {line.strip()}")
        m = LDD_LINE.search(line)
        if m:
            libs.append(m.group(1))
    return libs


def parse_file(spec):
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--file {spec!r}: expected SRC:DST or SRC:DST:MODE")
    src, dst = parts[0], parts[1]
    if not os.path.isfile(src):
        raise argparse.ArgumentTypeError(f"--file {spec!r}: {src} is not a file")
    mode = int(parts[2], 8) if len(parts) == 3 else None
    return src, dst, mode


def tar_info(name, kind, mode, size=0):
    info = tarfile.TarInfo(name.lstrip("/"))
    info.type, info.mode, info.size = kind, mode, size
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def write_layer(out, files, dirs):
    """Writes the layer tar to the open file `out`: directories first, then files by path."""
    entries = {}
    for dst, (src, data, mode) in files.items():
        entries[dst] = (src, data, mode)
        parent = os.path.dirname(dst)
        while parent not in ("", "/"):
            dirs.setdefault(parent, 0o755)
            parent = os.path.dirname(parent)
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs):
            tar.addfile(tar_info(d, tarfile.DIRTYPE, dirs[d]))
        for dst in sorted(entries):
            src, data, mode = entries[dst]
            if data is not None:
                tar.addfile(tar_info(dst, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))
            else:
                with open(src, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    tar.addfile(tar_info(dst, tarfile.REGTYPE, mode, size), f)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def blob(tar, data):
    """Adds a JSON blob to the layout; returns its descriptor fields (digest, size)."""
    raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(raw).hexdigest()
    tar.addfile(tar_info(f"blobs/sha256/{digest}", tarfile.REGTYPE, 0o644, len(raw)), io.BytesIO(raw))
    return {"digest": f"sha256:{digest}", "size": len(raw)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="full image reference, e.g. docker.io/kubetune/server:0.1.0")
    p.add_argument("--out", required=True, help="the OCI layout tar to write")
    p.add_argument("--file", action="append", type=parse_file, default=[], help="SRC:DST[:MODE]")
    p.add_argument("--entrypoint", action="append", default=[], help="one argument of the entrypoint; repeat")
    p.add_argument("--user", default="", help="uid:gid the image runs as (empty: root)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE; repeat")
    args = p.parse_args()

    files = {}
    for src, dst, mode in args.file:
        files[dst] = (src, None, mode if mode is not None else os.stat(src).st_mode & 0o777)
        for lib in shared_libraries(src):
            files.setdefault(lib, (os.path.realpath(lib), None, 0o755))
    files["/etc/passwd"] = (None, PASSWD.encode(), 0o644)
    files["/etc/group"] = (None, GROUP.encode(), 0o644)
    if os.path.isfile(CA_BUNDLE):
        files[CA_BUNDLE] = (os.path.realpath(CA_BUNDLE), None, 0o644)
    dirs = {"/tmp": 0o1777, "/home/nonroot": 0o755}

    out_dir = os.path.dirname(os.path.abspath(args.out))
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".layer") as layer:
        write_layer(layer, files, dirs)
        layer.flush()
        layer_digest, layer_size = sha256_of(layer.name), os.path.getsize(layer.name)
        tmp_out = args.out + ".partial"
        with tarfile.open(tmp_out, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(tar_info("blobs", tarfile.DIRTYPE, 0o755))
            tar.addfile(tar_info("blobs/sha256", tarfile.DIRTYPE, 0o755))
            with open(layer.name, "rb") as f:
                tar.addfile(tar_info(f"blobs/sha256/{layer_digest}", tarfile.REGTYPE, 0o644, layer_size), f)
            config = {
                "architecture": "amd64",
                "os": "linux",
                "config": {
                    "Entrypoint": args.entrypoint or None,
                    "User": args.user,
                    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"] + args.env,
                    "WorkingDir": "/",
                },
                "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
            }
            manifest = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(tar, config)},
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": f"sha256:{layer_digest}",
                        "size": layer_size,
                    }
                ],
            }
            manifest_desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(tar, manifest)}
            tag = args.name.rsplit(":", 1)[1] if ":" in args.name.rsplit("/", 1)[-1] else "latest"
            manifest_desc["annotations"] = {
                "io.containerd.image.name": args.name,
                "org.opencontainers.image.ref.name": tag,
            }
            manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
            index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_desc]}
            for name, data in (("oci-layout", {"imageLayoutVersion": "1.0.0"}), ("index.json", index)):
                raw = json.dumps(data, sort_keys=True).encode()
                tar.addfile(tar_info(name, tarfile.REGTYPE, 0o644, len(raw)), io.BytesIO(raw))
        os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()
