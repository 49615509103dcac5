# One VM from a disk image, stopped gracefully: on `nomad job stop` the driver presses the
# guest's ACPI power button and gives the guest up to kill_timeout to power off before it
# makes QEMU quit.
#
#   nomad job run -var "image_path=$PWD/fixtures/guest/guest.qcow2" examples/vm.nomad.hcl
#
# The image must be in the allocation dir or under a directory that the agent's plugin
# config lists in `image_paths`. The job config is the one Nomad's built-in qemu driver
# takes, so the same file runs under either driver.

variable "image_path" {
  type        = string
  description = "Absolute path of the VM's disk image (qcow2 or raw)."
}

job "vm" {
  datacenters = ["*"]
  type        = "service"

  group "vm" {
    restart {
      attempts = 0
      mode     = "fail"
    }

    task "vm" {
      driver       = "qemu"
      kill_timeout = "20s"

      config {
        image_path        = var.image_path
        accelerator       = "tcg"
        graceful_shutdown = true
      }

      resources {
        cpu    = 1000
        memory = 128
      }
    }
  }
}
