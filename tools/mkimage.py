#!/usr/bin/env python3
"""Build the offline test images of sluice as OCI image layouts, deterministically.

    tools/mkimage.py NAME OUT_DIR [--archive FILE] [--ref REF]

NAME is one of the images declared below (`tools/mkimage.py --list`). OUT_DIR receives
an OCI image layout (oci-layout, index.json, blobs/sha256/...); --archive also writes
the layout as one tar that `ctr images import` accepts. REF (default
`sluice.test/NAME:latest`) is recorded in index.json as the image name.

Same script + same inputs => byte-identical blobs: fixed mtimes, owners and order,
gzip headers without timestamps, pseudo-random content from fixed seeds.
Only the Python standard library is used.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import random
import sys
import tarfile

MIB = 1024 * 1024
EPOCH = 1_700_000_000  # default mtime of entries

# ---------------------------------------------------------------------------
# Declarative entries. Each layer is a list of dicts:
#   {"type": "dir"|"file"|"symlink"|"hardlink"|"char"|"block"|"fifo", "path": ...,
#    "mode", "uid", "gid", "mtime", "xattrs": {name: value},
#    file: "data" (bytes) or "random": (seed, size) or "source": host path,
#    symlink/hardlink: "target", char/block: "major", "minor"}
# Whiteouts are plain empty files named `.wh.NAME` / `.wh..wh..opq`.
# ---------------------------------------------------------------------------


def d(path, mode=0o755, **kw):
    return dict(type="dir", path=path, mode=mode, **kw)


def f(path, data=b"", mode=0o644, **kw):
    return dict(type="file", path=path, mode=mode, data=data, **kw)


def rnd(path, seed, size, mode=0o644, **kw):
    return dict(type="file", path=path, mode=mode, random=(seed, size), **kw)


def sym(path, target, **kw):
    return dict(type="symlink", path=path, target=target, mode=0o777, **kw)


def hard(path, target, **kw):
    return dict(type="hardlink", path=path, target=target, mode=0o644, **kw)


def dev(kind, path, major, minor, mode=0o666, **kw):
    return dict(type=kind, path=path, major=major, minor=minor, mode=mode, **kw)


def small_files(count):
    """Hundreds of small files, 100 B to 8 KiB: half text (compressible), half random."""
    rng = random.Random(4242)
    owners = [(0, 0), (1000, 1000), (65534, 65534), (123, 456)]
    entries = [d("data/small")]
    for i in range(count):
        size = rng.randint(100, 8192)
        uid, gid = owners[i % len(owners)]
        mtime = 1_000_000_000 + i * 86_400
        path = "data/small/f%03d.%s" % (i, "txt" if i % 2 == 0 else "bin")
        if i % 2 == 0:
            line = ("line of file %d; " % i).encode()
            data = (line * (size // len(line) + 1))[:size]
            entries.append(f(path, data, uid=uid, gid=gid, mtime=mtime))
        else:
            entries.append(rnd(path, 10_000 + i, size, mode=0o600, uid=uid, gid=gid, mtime=mtime))
    return entries


def everything_layers():
    lower = [
        d("bin"),
        d("etc"),
        f("etc/config", b"version=1\n"),
        f("etc/hostname", b"sluice-test\n", mtime=1_500_000_000),
        d("data"),
        d("data/nested"),
        d("data/nested/a"),
        d("data/nested/a/b"),
        d("data/nested/a/b/c", mode=0o750, uid=1000, gid=1000, mtime=1_234_567_890),
        f("data/nested/a/b/c/deep.txt", b"deep\n", uid=1000, gid=1000),
        d("data/nested/gone-dir"),
        f("data/nested/gone-dir/file", b"removed by a whiteout in the upper layer\n"),
        d("private", mode=0o700),
        f("private/secret", b"only root\n", mode=0o600),
        d("tmp", mode=0o1777),
        d("shared", mode=0o2775, gid=100),
        f("data/empty", b""),
        rnd("data/big.bin", 7, 52 * MIB + 12_345),
        f("data/hard-orig", b"one inode, three names\n", mode=0o640, uid=1000, gid=1000),
        hard("data/hard-link1", "data/hard-orig"),
        hard("data/nested/hard-link2", "data/hard-orig"),
        sym("data/link-rel", "small/f000.txt"),
        sym("data/link-abs", "/data/empty"),
        sym("data/link-dangling", "../does/not/exist"),
        sym("data/link-dir", "nested/a"),
        d("devices"),
        dev("char", "devices/null", 1, 3),
        dev("block", "devices/sda", 8, 0, mode=0o660, gid=6),
        dict(type="fifo", path="devices/fifo", mode=0o620),
        f("bin/suid", b"#!/bin/sh\n", mode=0o4755),
        f("bin/sgid", b"#!/bin/sh\n", mode=0o2755, gid=50),
        f("bin/sticky", b"sticky\n", mode=0o1644),
        f("bin/all-bits", b"all\n", mode=0o7777),
        f("data/owned-nobody", b"nobody\n", uid=65534, gid=65534),
        f("data/old", b"old\n", mtime=1),
        f("data/future", b"future\n", mtime=4_102_444_800),
        f(
            "data/xattrs",
            b"has extended attributes\n",
            xattrs={"user.comment": "hello sluice", "user.empty": "", "trusted.sluice": "trusted value"},
        ),
        d("data/xattr-dir", xattrs={"user.dir": "directory attribute"}),
        f("data/xattr-dir/inside", b"x\n"),
        f("data/" + "long-name-" * 12 + "end", b"long path needs PAX\n"),
        f("data/\u00fcn\u00efc\u00f8d\u00e9 name", b"utf-8 name\n"),
        f("data/to-delete", b"whited out by layer 2\n"),
        d("data/opaque-dir"),
        f("data/opaque-dir/x", b"hidden by opaque whiteout\n"),
        f("data/opaque-dir/y", b"hidden by opaque whiteout\n"),
        d("data/opaque-dir/sub"),
        f("data/opaque-dir/sub/z", b"hidden by opaque whiteout\n"),
    ] + small_files(300)
    upper = [
        d("data"),
        f("data/.wh.to-delete"),
        d("data/nested"),
        f("data/nested/.wh.gone-dir"),
        d("data/opaque-dir"),
        f("data/opaque-dir/.wh..wh..opq"),
        f("data/opaque-dir/new", b"only this survives in opaque-dir\n"),
        d("etc"),
        f("etc/config", b"version=2\n", mtime=1_600_000_000),
        f("data/upper-only", b"added by layer 2\n", uid=1000, gid=1000),
        rnd("data/upper-random.bin", 99, 3 * MIB + 7),
    ]
    top = [
        d("data"),
        f("data/to-delete", b"re-created by layer 3\n", mtime=1_650_000_000),
    ]
    return [lower, upper, top], {"Cmd": ["/bin/sh"], "WorkingDir": "/"}


BUSYBOX_APPLETS = [
    "[", "cat", "cp", "dd", "echo", "env", "false", "find", "grep", "head", "id",
    "ls", "md5sum", "mkdir", "rm", "sh", "sha256sum", "sleep", "stat", "tail",
    "test", "true", "wc",
]


def busybox_layers():
    base = [d("bin"), d("dev"), d("etc"), d("proc"), d("root", mode=0o700), d("sys"),
            d("tmp", mode=0o1777), d("usr"), d("usr/bin"), d("var")]
    base.append(dict(type="file", path="bin/busybox", mode=0o755, source="/bin/busybox"))
    base += [sym("bin/" + applet, "busybox") for applet in BUSYBOX_APPLETS]
    app = [
        d("etc"),
        f("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
        f("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
        d("usr"),
        d("usr/bin"),
        f("usr/bin/hello", b"#!/bin/sh\necho hello from sluice\n", mode=0o755),
    ]
    config = {
        "Entrypoint": ["/usr/bin/hello"],
        "Env": ["PATH=/usr/bin:/bin"],
        "WorkingDir": "/",
    }
    return [base, app], config


def app_layers():
    """busybox plus a layer of data the entrypoint never reads, as real images carry:
    a lazy pull must not fetch it."""
    layers, config = busybox_layers()
    data = [d("opt"), d("opt/data")]
    data += [rnd("opt/data/blob%d.bin" % i, 500 + i, 4 * MIB) for i in range(4)]
    return layers + [data], config


def demo_layers():
    """The demo's image: busybox, a small app, and 256 MiB the entrypoint never reads,
    the way real images carry toolchains, caches and assets."""
    layers, config = busybox_layers()
    assets = [d("opt"), d("opt/assets")]
    assets += [rnd("opt/assets/pack%02d.bin" % i, 900 + i, 16 * MIB) for i in range(16)]
    return layers + [assets], config


def profile_layers():
    """busybox plus a start script that reads a file whose name is computed at run time,
    which static analysis cannot find but a recorded run (`sluice profile`) sees."""
    layers, _ = busybox_layers()
    start = (b"#!/bin/sh\n"
             b"cat /data/$(echo a)b.txt\n"
             b"echo ready\n"
             b"exec sleep 600\n")
    app = [
        d("data"),
        f("data/ab.txt", b"read at run time\n"),
        f("data/never.txt", b"never read\n"),
        d("usr"),
        d("usr/bin"),
        f("usr/bin/start", start, mode=0o755),
    ]
    config = {
        "Entrypoint": ["/usr/bin/start"],
        "Env": ["PATH=/usr/bin:/bin"],
        "WorkingDir": "/",
    }
    return layers + [app], config


IMAGES = {
    "everything": everything_layers,
    "busybox": busybox_layers,
    "app": app_layers,
    "demo": demo_layers,
    "profile": profile_layers,
}

# ---------------------------------------------------------------------------


def random_bytes(seed, size):
    return random.Random(seed).randbytes(size)


def entry_data(entry):
    if "random" in entry:
        return random_bytes(*entry["random"])
    if "source" in entry:
        with open(entry["source"], "rb") as src:
            return src.read()
    return entry.get("data", b"")


def sort_key(entry):
    # Hard links must follow their target; everything else in path order, which puts
    # parents before children and `.wh.` entries before their siblings.
    return (entry["type"] == "hardlink", entry["path"].encode())


def layer_tar(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(entries, key=sort_key):
            info = tarfile.TarInfo(entry["path"] + ("/" if entry["type"] == "dir" else ""))
            info.mode = entry.get("mode", 0o644)
            info.uid = entry.get("uid", 0)
            info.gid = entry.get("gid", 0)
            info.uname = ""
            info.gname = ""
            info.mtime = entry.get("mtime", EPOCH)
            xattrs = entry.get("xattrs", {})
            if xattrs:
                info.pax_headers = {"SCHILY.xattr." + k: v for k, v in sorted(xattrs.items())}
            data = None
            kind = entry["type"]
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "file":
                data = entry_data(entry)
                info.type = tarfile.REGTYPE
                info.size = len(data)
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = entry["target"]
            elif kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = entry["target"]
            elif kind in ("char", "block"):
                info.type = tarfile.CHRTYPE if kind == "char" else tarfile.BLKTYPE
                info.devmajor = entry["major"]
                info.devminor = entry["minor"]
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            else:
                raise ValueError("unknown entry type %r for %s" % (kind, entry["path"]))
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def gzip_bytes(data):
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=6, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def host_arch():
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x", "riscv64": "riscv64"}.get(machine, machine)


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class Layout:
    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.blob_dir = os.path.join(out_dir, "blobs", "sha256")
        os.makedirs(self.blob_dir, exist_ok=True)

    def add_blob(self, data, media_type):
        digest = sha256(data)
        path = os.path.join(self.blob_dir, digest.split(":", 1)[1])
        if not os.path.exists(path):
            tmp = path + ".tmp"
            with open(tmp, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def write_file(self, name, data):
        with open(os.path.join(self.out_dir, name), "wb") as out:
            out.write(data)


def build(name, out_dir, ref):
    layers, exec_config = IMAGES[name]()
    layout = Layout(out_dir)
    arch = host_arch()
    layer_descriptors = []
    diff_ids = []
    history = []
    for index, entries in enumerate(layers):
        tar_bytes = layer_tar(entries)
        diff_ids.append(sha256(tar_bytes))
        layer_descriptors.append(
            layout.add_blob(gzip_bytes(tar_bytes), "application/vnd.oci.image.layer.v1.tar+gzip"))
        history.append({"created": "2026-01-01T00:00:00Z",
                        "created_by": "tools/mkimage.py %s layer %d" % (name, index)})
    config = {
        "architecture": arch,
        "os": "linux",
        "created": "2026-01-01T00:00:00Z",
        "config": exec_config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    config_descriptor = layout.add_blob(
        canonical_json(config), "application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_descriptor,
        "layers": layer_descriptors,
    }
    manifest_descriptor = layout.add_blob(
        canonical_json(manifest), "application/vnd.oci.image.manifest.v1+json")
    manifest_descriptor["platform"] = {"architecture": arch, "os": "linux"}
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    manifest_descriptor["annotations"] = {
        "io.containerd.image.name": ref,
        "org.opencontainers.image.ref.name": tag,
    }
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_descriptor],
    }
    layout.write_file("oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
    layout.write_file("index.json", canonical_json(index))
    return manifest_descriptor


def write_archive(out_dir, archive):
    tmp = archive + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        names = ["oci-layout", "index.json", "blobs", "blobs/sha256"]
        names += ["blobs/sha256/" + n for n in sorted(os.listdir(os.path.join(out_dir, "blobs", "sha256")))]
        for name in names:
            path = os.path.join(out_dir, name)
            info = tar.gettarinfo(path, arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = EPOCH
            info.mode = 0o755 if info.isdir() else 0o644
            if info.isdir():
                tar.addfile(info)
            else:
                with open(path, "rb") as src:
                    tar.addfile(info, src)
    os.replace(tmp, archive)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?")
    parser.add_argument("out_dir", nargs="?")
    parser.add_argument("--archive", help="also write the layout as a tar for `ctr images import`")
    parser.add_argument("--ref", help="image name recorded in index.json")
    parser.add_argument("--list", action="store_true", help="list the images this script can build")
    args = parser.parse_args()
    if args.list:
        print("\n".join(sorted(IMAGES)))
        return 0
    if args.name not in IMAGES or not args.out_dir:
        parser.error("need NAME (one of %s) and OUT_DIR" % ", ".join(sorted(IMAGES)))
    ref = args.ref or "sluice.test/%s:latest" % args.name
    descriptor = build(args.name, args.out_dir, ref)
    if args.archive:
        write_archive(args.out_dir, args.archive)
    print(json.dumps({"manifest": descriptor["digest"], "ref": ref}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
