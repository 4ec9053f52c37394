"""The platform around the API: keys, the account's own API, the admin API, the dashboard and its sessions."""
