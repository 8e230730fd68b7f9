# The machine: boot the base disk under QEMU, reach it over SSH on 127.0.0.1 only.
source "qemu" "builder" {
  disk_image       = true
  iso_url          = var.base_image
  iso_checksum     = var.base_image_checksum
  use_backing_file = false
  output_directory = var.output_dir
  vm_name          = "${var.name}.qcow2"
  format           = "qcow2"
  disk_size        = "${var.disk_size_mib}M"
  skip_compaction  = true
  disk_compression = false
  accelerator      = var.accelerator
  headless         = true
  memory           = var.memory
  cpus             = var.cpus
  disk_interface   = "virtio"
  net_device       = "virtio-net"
  # Every port Packer opens stays on loopback: VNC, the package server, SSH (below).
  vnc_bind_address  = "127.0.0.1"
  http_bind_address = "127.0.0.1"
  http_directory    = var.http_directory

  # Packer forwards its SSH port on every interface unless the netdev is ours.
  qemuargs = [
    ["-netdev", "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"],
    ["-device", "virtio-net,netdev=user.0"],
    ["-serial", "file:${var.serial_log}"],
  ]

  communicator         = "ssh"
  ssh_username         = var.ssh_username
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = "20m"
  shutdown_command     = "sudo systemctl poweroff"
  shutdown_timeout     = "5m"
}
