import os

bind = os.environ["EXAMPLE_BIND"]
workers = 4
threads = 8
worker_class = "gthread"
control_socket_disable = True
