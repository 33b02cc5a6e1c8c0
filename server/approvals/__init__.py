"""Human approval: a call whose decision carries `require_approval` waits, bound to its exact tool,
arguments, identity and run, until an approver in the named groups decides or the wait times out.

`request` holds the data, `store` the queue's storage, `queue` the rules (binding, self-approval,
waiting), `stage` the pipeline stage, `webhook` the signed notification, `routes` /admin/approvals.
"""
