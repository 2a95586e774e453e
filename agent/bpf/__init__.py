"""The only code that talks to bcc: loading programs, record layouts, map drains, compiler memory."""
