# Inputs of the builder-image build. Python writes one var-file per build (targets/*.pkrvars.hcl
# holds the per-target defaults); nothing here is generated.

variable "name" {
  type        = string
  description = "Environment name; the image is <name>.qcow2."
}

variable "base_image" {
  type        = string
  description = "The bootable base disk made from the locked package set (qcow2)."
}

variable "base_image_checksum" {
  type        = string
  description = "sha256:<hex> of base_image."
}

variable "output_dir" {
  type = string
}

variable "accelerator" {
  type        = string
  default     = "tcg"
  description = "kvm where a probe showed it can run a guest, tcg otherwise."

  validation {
    condition     = contains(["kvm", "tcg"], var.accelerator)
    error_message = "The accelerator must be kvm or tcg."
  }
}

variable "memory" {
  type    = number
  default = 2048
}

variable "cpus" {
  type    = number
  default = 2
}

variable "disk_size_mib" {
  type    = number
  default = 8192
}

variable "ssh_username" {
  type    = string
  default = "builder"
}

variable "ssh_private_key_file" {
  type = string
}

variable "http_directory" {
  type        = string
  description = "Served to the guest at http://10.0.2.2:<port>/: the local package repository."
}

variable "playbook" {
  type = string
}

variable "extra_vars_file" {
  type        = string
  description = "JSON file of Ansible extra-vars written by provision."
}

variable "roles_path" {
  type = string
}

variable "manifest" {
  type = string
}

variable "serial_log" {
  type = string
}
