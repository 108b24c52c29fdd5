module tpenv.test/getter

go 1.21
