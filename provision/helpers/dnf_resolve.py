"""Resolve an rpm package set with dnf's API. Run by the Python that has dnf (/usr/bin/python3).

Reads a JSON request on stdin, writes a JSON answer on stdout; exits 2 with a one-line message
on stderr for a resolution problem and 3 when a repository cannot be loaded.
Kept free of the provision package so that it runs under any interpreter that has dnf.
"""

import json
import sys


def main() -> int:
    import dnf  # type: ignore[import-not-found]
    import dnf.exceptions  # type: ignore[import-not-found]
    import hawkey  # type: ignore[import-not-found]

    req = json.load(sys.stdin)
    base = dnf.Base()
    conf = base.conf
    conf.installroot = req["installroot"]
    conf.cachedir = req["cachedir"]
    conf.reposdir = []
    conf.install_weak_deps = False
    conf.substitutions["basearch"] = req["arch"]
    conf.substitutions["arch"] = req["arch"]
    conf.releasever = req.get("releasever") or "1"
    conf.substitutions["releasever"] = conf.releasever
    conf.arch = req["arch"]
    for r in req["repos"]:
        repo = base.repos.add_new_repo(r["name"], conf, baseurl=[r["baseurl"]])
        repo.gpgcheck = False  # packages are checked against their keys when the root is built
        repo.skip_if_unavailable = False
    try:
        base.fill_sack(load_system_repo=False, load_available_repos=True)
    except dnf.exceptions.RepoError as e:
        print(f"mirror unreachable: {e}", file=sys.stderr)
        return 3
    missing = []
    for name in req["packages"]:
        try:
            base.install(name)
        except dnf.exceptions.MarkingError:
            missing.append(name)
    if missing:
        print(f"no such package in the repos: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        base.resolve()
    except dnf.exceptions.DepsolveError as e:
        print(f"cannot resolve: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    out = []
    for p in sorted(base.transaction.install_set, key=lambda p: (p.name, p.arch)):
        ck = p.chksum
        out.append({
            "name": p.name, "epoch": p.epoch, "version": p.version, "release": p.release,
            "arch": p.arch, "repo": p.reponame, "location": p.location, "size": p.downloadsize,
            "checksum_type": hawkey.chksum_name(ck[0]) if ck else None,
            "checksum": ck[1].hex() if ck else None,
            "sourcerpm": p.sourcerpm or "", "buildtime": p.buildtime,
        })
    json.dump({"packages": out}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
