"""VM knowledge: what a working area's VM is, which files are part of it, whether it runs.

Nothing here touches git storage (a test keeps it so): these modules read
hypervisor configurations, disk image headers and lock state, and decide
which files of an area belong to the VM.  The QEMU/QMP code that runs VMs
and saves them live joins them here.
"""
