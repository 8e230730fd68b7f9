# A connection to a chroot directory (the target's "host name" is the directory), so the
# roles that configure a builder over SSH also configure a chroot: ansible-core has no chroot
# connection of its own. Modules run with the chroot's python3.
from __future__ import annotations

DOCUMENTATION = """
name: provision_chroot
short_description: Run tasks in a chroot directory on the controller
description:
  - Runs commands with chroot(8) in the directory named by the inventory host; needs root.
author: provision
options:
  remote_addr:
    description: The chroot directory.
    default: inventory_hostname
    vars:
      - name: inventory_hostname
      - name: ansible_host
"""

import os
import shutil
import subprocess

from ansible.errors import AnsibleError
from ansible.plugins.connection import ConnectionBase


class Connection(ConnectionBase):
    transport = "provision_chroot"
    has_pipelining = True
    default_user = "root"

    def _root(self) -> str:
        root = self.get_option("remote_addr")
        if not os.path.isdir(root):
            raise AnsibleError(f"{root} is not a directory")
        return os.path.realpath(root)

    def _connect(self) -> Connection:
        if os.geteuid() != 0:
            raise AnsibleError("the provision_chroot connection needs root")
        self._connected = True
        return self

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True
                     ) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        argv = ["chroot", self._root(), "/bin/sh", "-c", cmd]
        proc = subprocess.run(argv, input=in_data, capture_output=True, check=False)
        return proc.returncode, proc.stdout, proc.stderr

    def _inside(self, path: str) -> str:
        root = self._root()
        target = os.path.realpath(os.path.join(root, path.lstrip("/")))
        if target != root and not target.startswith(root + os.sep):
            raise AnsibleError(f"{path} leaves the chroot")
        return target

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        shutil.copyfile(in_path, self._inside(out_path))

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        shutil.copyfile(self._inside(in_path), out_path)

    def close(self) -> None:
        self._connected = False


