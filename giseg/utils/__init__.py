"""The ground floor, one job per module (as timm's utils/ and nnU-Net's utilities/): import from the module.

    errors    UserError; the storage's errors (full disk, permissions) as one line
    exits     @command (UserError -> one `error:` line, exit 2; a signal -> 128 + N); stop_on_signals
    files     atomic writes, folder replaces a crash can undo, strict JSON, CSVs read as strings
    claims    a command claims its output folder or file before it writes
    locks     FolderLock
    log       the logger: one timestamped line per event
    memory    the allocator tuned for training steps; freed memory handed back
    options   options declared once, as dataclass fields
"""
