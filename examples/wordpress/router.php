<?php
/* php -S router: /wp-content/... from WORDPRESS_CONTENT_DIR (the mounted volume), as Apache's
 * Alias does in the pod; other static files as they are; everything else through WordPress. */
$path = parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH);
$content = getenv('WORDPRESS_CONTENT_DIR');
if ($content && strpos($path, '/wp-content/') === 0 && strpos($path, '..') === false) {
    $file = $content . substr($path, strlen('/wp-content'));
    if (is_file($file) && substr($file, -4) !== '.php') {
        header('Content-Type: ' . (mime_content_type($file) ?: 'application/octet-stream'));
        header('X-Served-By: laptop');  // as the mu-plugin marks the pages: who answered is visible
        readfile($file);
        return true;
    }
}
if ($path !== '/' && is_file($_SERVER['DOCUMENT_ROOT'] . $path)) {
    return false;  // the built-in server serves it (static file or a PHP entry point)
}
require $_SERVER['DOCUMENT_ROOT'] . '/index.php';
