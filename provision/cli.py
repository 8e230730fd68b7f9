"""The command line: a thin layer over the library. One error root, caught once here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from provision import __version__
from provision.errors import ProvisionError, SpecError
from provision.index import parse_ref

USAGE_EXIT = 2


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True))


def _cache(args: argparse.Namespace) -> Path | None:
    return Path(args.cache) if args.cache else None


def _public_key(value: str | None) -> str | None:
    """--public-key: the key itself (ed25519:...) or a file holding it (KEY.pub)."""
    if not value or value.startswith("ed25519:"):
        return value
    try:
        return Path(value).read_text().strip()
    except OSError as e:
        raise ProvisionError(f"cannot read public key {value}: {e.strerror}") from None


def _store(args: argparse.Namespace, url: str | None = None) -> Any:
    from provision.store import open_store

    return open_store(url or args.store, public_key=_public_key(args.public_key),
                      signing_key=Path(args.signing_key) if args.signing_key else None)


def cmd_check(args: argparse.Namespace) -> int:
    from provision.spec import load_spec

    spec = load_spec(Path(args.spec))
    for w in spec.warnings:
        print(f"provision: warning: {w}", file=sys.stderr)
    if args.json:
        _print_json({"name": spec.name, "family": spec.family.value, "digest": spec.digest(),
                     "repos": len(spec.repos), "packages": len(spec.packages)})
    else:
        print(f"{spec.path}: ok: {spec.name} ({spec.family.value}, {spec.arch}, "
              f"{len(spec.repos)} repos, {len(spec.packages)} packages)")
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    from provision.lock import lock_spec
    from provision.spec import load_spec

    spec = load_spec(Path(args.spec))
    lock = lock_spec(spec)
    size = sum(p.size for p in lock.packages)
    if args.json:
        _print_json({"name": lock.name, "lock": str(spec.lock_path), "digest": lock.digest(),
                     "packages": len(lock.packages), "download_size": size,
                     "source_date_epoch": lock.source_date_epoch})
    else:
        print(f"{spec.lock_path}: {len(lock.packages)} packages, {size / 1e6:.1f} MB, "
              f"{lock.digest()}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from provision.build import build
    from provision.spec import load_spec

    spec = load_spec(Path(args.spec))
    result = build(spec, _store(args), relock=args.relock, cache_dir=_cache(args),
                   accelerator=args.accelerator)
    v = result.version
    if args.json:
        _print_json({"name": result.name, "digest": v.digest, "size": v.size,
                     "tar_sha256": v.tar_sha256, "tar_size": v.tar_size,
                     "lock_digest": v.lock_digest, "packages": v.package_count,
                     "store": result.store})
    else:
        print(f"{result.name}@{v.digest}  {v.size / 1e6:.1f} MB  {v.package_count} packages  "
              f"-> {result.store}")
    return 0


def _target(args: argparse.Namespace) -> tuple[Any, Any]:
    from provision.fetch import resolve_target

    ref = parse_ref(args.ref) if args.ref else None
    return resolve_target(ref, args.store, _public_key(args.public_key))


def cmd_fetch(args: argparse.Namespace) -> int:
    from provision.fetch import fetch, fetch_artifact

    ref, store = _target(args)
    if args.artifact:
        path = fetch_artifact(ref, store, args.artifact, cache_dir=_cache(args))
        if args.json:
            _print_json({"name": ref.name, "artifact": args.artifact, "path": str(path)})
        else:
            print(path)
        return 0
    got = fetch(ref, store, cache_dir=_cache(args))
    if args.json:
        _print_json({"name": got.name, "digest": got.digest, "root": str(got.root),
                     "store": got.store, "cached": got.cached})
    else:
        print(got.root)
    return 0


def _enter(args: argparse.Namespace, argv: list[str]) -> int:
    from provision.cache import default_cache_dir
    from provision.enter import enter
    from provision.fetch import fetch

    ref, store = _target(args)
    got = fetch(ref, store, cache_dir=_cache(args))
    cache = _cache(args) or default_cache_dir()
    keep = None
    if args.keep is not None:
        import datetime as dt

        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        keep = Path(args.keep) if args.keep else cache / "kept" / f"{ref.name}-{stamp}"
        if keep.exists():
            raise ProvisionError(f"--keep: {keep} exists")
        keep.parent.mkdir(parents=True, exist_ok=True)
    rc = enter(got.root, argv, scratch_dir=cache / "run", bind=Path.cwd(), keep=keep)
    if keep is not None:
        print(f"provision: kept the run's changes (the overlay's upper layer) in {keep}",
              file=sys.stderr)
    return rc


def cmd_run(args: argparse.Namespace) -> int:
    return _enter(args, list(args.command))


def cmd_shell(args: argparse.Namespace) -> int:
    return _enter(args, ["/bin/sh", "-c", 'exec "$(command -v bash || echo /bin/sh)" -l'])


def cmd_pin(args: argparse.Namespace) -> int:
    from provision.pin import PIN_FILE, Pin, write_pin
    from provision.store import default_store_url

    ref = parse_ref(args.ref)
    store = _store(args)
    index = store.read_index()
    _env, version = index.resolve(ref)
    path = Path(args.file or PIN_FILE)
    # The signing key: the one given or configured, else the one the index is signed by now
    # (trust on first use, as ssh's known_hosts): from then on, only that key is accepted.
    key = store.trusted_key or index.signed_by
    pin = Pin(ref.name, version.digest, args.store or default_store_url(), key)
    write_pin(pin, path)
    if args.json:
        _print_json({"name": pin.name, "digest": pin.digest, "store": pin.store,
                     "public_key": pin.public_key, "file": str(path)})
    else:
        print(f"{path}: {pin.name}@{pin.digest}")
        if key and not store.trusted_key:
            print(f"provision: pinned the index's signing key {key}", file=sys.stderr)
    return 0


def cmd_sources(args: argparse.Namespace) -> int:
    from provision.sources import publish_sources

    ref, store = _target(args)
    bundle = publish_sources(ref, store, cache_dir=_cache(args), allow_missing=args.allow_missing)
    if args.json:
        _print_json({"name": ref.name, "digest": bundle.digest, "sources": len(bundle.sources),
                     "files": len(bundle.files()), "size": bundle.size,
                     "missing": [m.name for m in bundle.missing], "store": store.url})
    else:
        print(f"{ref.name}@{bundle.digest}: {len(bundle.sources)} source packages, "
              f"{len(bundle.files())} files, {bundle.size / 1e6:.1f} MB"
              + (f", {len(bundle.missing)} missing" if bundle.missing else "") + f" -> {store.url}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from provision.verify import verify

    ref, store = _target(args)
    got = verify(ref, store, rebuild=args.rebuild, cache_dir=_cache(args),
                 diffoscope=args.diffoscope)
    if args.json:
        _print_json({"name": got.name, "digest": got.digest, "blobs": got.blobs,
                     "rebuilt": got.rebuilt, "ok": True})
    else:
        what = f"{got.blobs} blobs verified"
        if got.rebuilt:
            what += "; the rebuild from its lock has the same digest"
        print(f"{got.name}@{got.digest}: ok ({what})")
    return 0


def cmd_oci(args: argparse.Namespace) -> int:
    from provision.oci import oci_for

    ref, store = _target(args)
    got, version = oci_for(ref, store, Path(args.output) if args.output else None,
                           cache_dir=_cache(args))
    if args.json:
        _print_json({"name": ref.name, "digest": version.digest, "path": str(got.path),
                     "archive_digest": got.digest, "manifest_digest": got.manifest_digest,
                     "layer_digest": got.layer_digest, "image": got.image_ref})
    else:
        print(got.path)
        print(f"provision: {got.image_ref}: manifest {got.manifest_digest}; podman load -i "
              f"{got.path}", file=sys.stderr)
    return 0


def cmd_mock_config(args: argparse.Namespace) -> int:
    from provision.mockcfg import mock_config

    ref, store = _target(args)
    got = mock_config(ref, store, Path(args.output) if args.output else None,
                      cache_dir=_cache(args))
    if args.json:
        _print_json({"name": ref.name, "digest": got.version.digest, "config": str(got.path),
                     "root": got.root, "root_cache": str(got.cache_file)})
    else:
        print(got.path)
        print(f"provision: mock -r {got.path} --rebuild PKG.src.rpm", file=sys.stderr)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from provision.config import default_signing_key
    from provision.signing import generate_key

    path = Path(args.out) if args.out else default_signing_key()
    signer = generate_key(path, force=args.force)
    if args.json:
        _print_json({"private_key": str(path), "public_key": signer.public_key,
                     "public_key_file": str(path) + ".pub"})
    else:
        print(signer.public_key)
        print(f"provision: wrote {path} (keep it secret) and {path}.pub; indexes written with "
              f"it are signed", file=sys.stderr)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from provision.publish import publish

    ref = parse_ref(args.ref)
    regions = [r for r in (args.ami_regions or "").split(",") if r]
    got = publish(ref, _store(args), _store(args, args.to), ami_regions=regions)
    if args.json:
        _print_json({"name": got.name, "digest": got.version.digest, "store": got.store,
                     "public_url": got.public_url, "copied": got.copied, "amis": got.amis})
    else:
        print(f"{got.name}@{got.version.digest} -> {got.store}")
        if got.public_url:
            print(f"consumers: provision fetch {got.name} --store {got.public_url}")
        for region, ami in sorted(got.amis.items()):
            print(f"{region}: {ami}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    index = store.read_index()
    if args.json:
        _print_json({"store": store.url, "environments": {
            name: {"tags": env.tags, "versions": [
                {k: v for k, v in ver.to_dict().items() if k != "packages"}
                for ver in env.versions]}
            for name, env in sorted(index.environments.items())}})
        return 0
    if not index.environments:
        print(f"no environments in {store.url}")
        return 0
    print(f"{'NAME':24} {'DIGEST':20} {'SIZE':>10} {'PKGS':>5}  {'CREATED':20} TAGS")
    for name, env in sorted(index.environments.items()):
        for v in env.versions:
            tags = ",".join(sorted(t for t, d in env.tags.items() if d == v.digest))
            print(f"{name:24} {v.digest[:19]:20} {v.size / 1e6:8.1f}MB {v.package_count:5}  "
                  f"{v.created:20} {tags}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="provision",
        description="Reproducible, content-addressed build environments.")
    p.add_argument("--version", action="version", version=f"provision {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log every command run")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object")
    common.add_argument("--store", default=None,
                        help="store path or URL (default: $PROVISION_STORE or "
                             "~/.local/share/provision/store)")
    common.add_argument("--cache", default=None,
                        help="cache directory (default: ~/.cache/provision)")
    common.add_argument("--public-key", default=None, metavar="KEY",
                        help="only accept an index signed by this key (ed25519:... or a .pub "
                             "file; default: the pin file's, the config's, $PROVISION_PUBLIC_KEY)")
    common.add_argument("--signing-key", default=None, metavar="PATH",
                        help="sign the index with this key (default: $PROVISION_SIGNING_KEY, the "
                             "config's, or ~/.config/provision/signing.key if it exists)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("check", parents=[common], help="validate a spec")
    s.add_argument("spec")
    s.set_defaults(func=cmd_check)
    s = sub.add_parser("lock", parents=[common], help="resolve a spec into SPEC.lock")
    s.add_argument("spec")
    s.set_defaults(func=cmd_lock)
    s = sub.add_parser("build", parents=[common], help="build an environment into the store")
    s.add_argument("spec")
    s.add_argument("--relock", action="store_true", help="resolve the lock again first")
    s.add_argument("--accelerator", choices=["kvm", "tcg"],
                   help="for VM outputs: QEMU accelerator (default: kvm if a probe shows it "
                        "works, else tcg; or $PROVISION_ACCELERATOR)")
    s.set_defaults(func=cmd_build)
    s = sub.add_parser("fetch", parents=[common], help="fetch, verify and unpack; print the root")
    s.add_argument("ref", nargs="?", help="NAME, NAME:TAG or NAME@sha256:HEX (default: the pin)")
    s.add_argument("--artifact",
                   choices=["qcow2", "vagrant", "ssh-key", "sbom", "sources", "spec", "oci"],
                   help="fetch another output of the environment instead of its chroot")
    s.set_defaults(func=cmd_fetch)
    s = sub.add_parser("run", parents=[common], help="run a command in an environment",
                       usage="provision run [REF] -- CMD [ARG ...]")
    s.add_argument("ref", nargs="?")
    keep_help = ("keep what the command changed (the overlay's upper layer) in DIR (default: "
                 "~/.cache/provision/kept/NAME-TIME) instead of discarding it")
    s.add_argument("--keep", nargs="?", const="", metavar="DIR", help=keep_help)
    s.add_argument("command", nargs="*", help="after --: the command and its arguments")
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("shell", parents=[common], help="an interactive shell in an environment")
    s.add_argument("ref", nargs="?")
    s.add_argument("--keep", nargs="?", const="", metavar="DIR", help=keep_help)
    s.set_defaults(func=cmd_shell)
    s = sub.add_parser("pin", parents=[common], help="write provision.pin for a source tree")
    s.add_argument("ref")
    s.add_argument("--file", help=f"pin file to write (default: ./{'provision.pin'})")
    s.set_defaults(func=cmd_pin)
    s = sub.add_parser("list", parents=[common], help="list environments, versions and tags")
    s.set_defaults(func=cmd_list)
    s = sub.add_parser("publish", parents=[common],
                       help="copy an environment to another store (a path or s3://bucket/prefix)")
    s.add_argument("ref", help="NAME, NAME:TAG or NAME@sha256:HEX in --store")
    s.add_argument("--to", required=True, metavar="URL",
                   help="destination store: s3://BUCKET/PREFIX[?endpoint=URL&region=R] or a path")
    s.add_argument("--ami-regions", metavar="R1,R2",
                   help="also make public AMIs from the VM image: imported in the first region, "
                        "copied to the others")
    s.set_defaults(func=cmd_publish)
    s = sub.add_parser("sources", parents=[common],
                       help="gather the source packages of an environment into its store")
    s.add_argument("ref", nargs="?", help="NAME, NAME:TAG or NAME@sha256:HEX (default: the pin)")
    s.add_argument("--allow-missing", action="store_true",
                   help="publish even if copyleft sources are missing (they are listed)")
    s.set_defaults(func=cmd_sources)
    s = sub.add_parser("verify", parents=[common],
                       help="check a version's blobs; --rebuild: rebuild it and compare")
    s.add_argument("ref", nargs="?", help="NAME, NAME:TAG or NAME@sha256:HEX (default: the pin)")
    s.add_argument("--rebuild", action="store_true",
                   help="rebuild from the published spec and lock and compare the digest")
    s.add_argument("--diffoscope", action="store_true",
                   help="on a mismatch, also show diffoscope's report (if installed)")
    s.set_defaults(func=cmd_verify)
    s = sub.add_parser("oci", parents=[common],
                       help="write an environment as an OCI image archive (podman load, skopeo)")
    s.add_argument("ref", nargs="?", help="NAME, NAME:TAG or NAME@sha256:HEX (default: the pin)")
    s.add_argument("-o", "--output", metavar="FILE",
                   help="where to write it (default: ~/.cache/provision/oci/NAME-HEX.oci.tar)")
    s.set_defaults(func=cmd_oci)
    s = sub.add_parser("mock-config", parents=[common],
                       help="write a mock config whose chroot is the environment's archive")
    s.add_argument("ref", nargs="?", help="NAME, NAME:TAG or NAME@sha256:HEX (default: the pin)")
    s.add_argument("-o", "--output", metavar="FILE", help="config file (default: ./NAME.cfg)")
    s.set_defaults(func=cmd_mock_config)
    s = sub.add_parser("keygen", parents=[common], help="make an Ed25519 key to sign indexes")
    s.add_argument("--out", metavar="PATH",
                   help="private key file (default: ~/.config/provision/signing.key)")
    s.add_argument("--force", action="store_true", help="replace an existing key")
    s.set_defaults(func=cmd_keygen)
    from provision.validate import add_parser as add_validate_parser

    add_validate_parser(sub, parents=[common])
    from provision.ami import add_parser as add_ami_parser

    add_ami_parser(sub, parents=[common])
    return p


def _split_run(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """`run [REF] -- CMD...`: everything after the first -- is the command, untouched."""
    if argv and argv[0] == "run" and "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    head, command = _split_run(args_list)
    args = parser().parse_args(head)
    if command is not None:
        args.command = command
    elif getattr(args, "func", None) is cmd_run:
        cmd = list(args.command)
        if args.ref and not cmd:
            print("provision: error: no command given (provision run [REF] -- CMD ...)",
                  file=sys.stderr)
            return USAGE_EXIT
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="provision: %(message)s")
    try:
        rc: int = args.func(args)
        return rc
    except SpecError as e:
        for line in e.problems:
            print(f"provision: error: {line}", file=sys.stderr)
        return 1
    except ProvisionError as e:
        print(f"provision: error: {e}", file=sys.stderr)
        for line in getattr(e, "problems", ())[:200]:
            print(f"  {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("provision: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
