"""Appliance state shared by aziza-bridge and aziza-admin.

PostgreSQL: ``models`` (records + input rules), ``migrate`` (versioned schema), ``repo`` (sync CRUD for the
CLI), ``db`` (the bridge's async reads), ``routing`` (DID -> persona, cached), ``records`` (call records
written behind the call). Redis: ``leases`` (capacity), ``live`` (live calls + events). Also ``health``,
``voice`` (voice prompt WAVs), ``asterisk_render`` (Asterisk config from the DID table) and ``bench``.
"""
