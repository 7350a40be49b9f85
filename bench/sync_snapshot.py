#!/usr/bin/env python3
"""Mirror one commit of the repository into a build folder, for bench builds.

    git archive HEAD | python3 bench/sync_snapshot.py DEST

Other engineers edit the shared working tree while the benchmark builds,
so building it directly fails half-way ("file modified during the build")
or measures code nobody committed. This writes the committed tree to DEST
instead, touching only files whose content changed (and deleting files the
commit no longer has), so `swift build` stays incremental between runs.
"""
import os
import sys
import tarfile


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: git archive HEAD | sync_snapshot.py DEST")
    dest = os.path.abspath(sys.argv[1])
    os.makedirs(dest, exist_ok=True)
    wanted, changed = set(), 0
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as archive:
        for member in archive:
            path = os.path.normpath(os.path.join(dest, member.name))
            if not path.startswith(dest + os.sep):
                sys.exit(f"refusing path outside {dest}: {member.name}")
            if member.isdir():
                os.makedirs(path, exist_ok=True)
                continue
            if not member.isfile():
                continue  # symlinks and the like: none in this repository
            wanted.add(path)
            data = archive.extractfile(member).read()
            try:
                with open(path, "rb") as f:
                    if f.read() == data:
                        continue
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, member.mode & 0o777)
            changed += 1
    removed = 0
    for root, _dirs, files in os.walk(dest):
        for name in files:
            path = os.path.join(root, name)
            if path not in wanted and name != "Package.resolved":
                os.remove(path)
                removed += 1
    print(f"snapshot in {dest}: {changed} files written, {removed} removed")


if __name__ == "__main__":
    main()
