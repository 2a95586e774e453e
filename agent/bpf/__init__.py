"""The only code that talks to bcc: loading programs, the one C<->Python contract (record layouts,
enums, counter slots: layouts.py, checked by contract.py), record decoding, map drains, compiler memory."""
