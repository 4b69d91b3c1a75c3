"""The daemon: lifecycle supervisor (bind, signals, drain), reload, systemd notify, logging, GC tuning."""
