# Defaults for a Debian builder machine; provision's generated var-file overrides per build.
memory        = 2048
cpus          = 2
disk_size_mib = 8192
ssh_username  = "builder"
