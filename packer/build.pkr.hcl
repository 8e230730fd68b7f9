# The build: Ansible configures the guest (the same roles run on a chroot or under Vagrant);
# artifacts are read from the manifest, never from Packer's output.
build {
  sources = ["source.qemu.builder"]

  provisioner "ansible" {
    playbook_file   = var.playbook
    user            = var.ssh_username
    use_proxy       = false
    extra_arguments = ["--extra-vars", "@${var.extra_vars_file}"]
    ansible_env_vars = [
      "ANSIBLE_ROLES_PATH=${var.roles_path}",
      "ANSIBLE_HOST_KEY_CHECKING=False",
      "ANSIBLE_NOCOWS=1",
    ]
  }

  post-processor "manifest" {
    output     = var.manifest
    strip_path = false
  }
}
