"""netsetup: puts the DNS appliance container on the LAN (deploy, route, firewall, check)."""
